/* The zygote's native part (see _zygote_main.py and zygote.py): its loop, zy_serve, reads
 * the host's fork requests and returns only in each run's program; zy_spawn makes a run's
 * two processes, G (pid 1 of the run's namespaces) and H (pid 2, the program), at the
 * price of one copy of the interpreter instead of two.
 *
 *   zygote --clone(CLONE_VM | new namespaces)--> G --fork--> H
 *
 * G shares the zygote's memory (no page tables copied, nothing copied on write, nothing to
 * tear down at its exit) and runs only the C below on a stack of its own. It sets the run's
 * rlimits, reports (its credentials tell the host its pid) and forks H while the zygote
 * waits inside zy_spawn: H is a copy of an interpreter stopped at a known point. Each of G
 * and H joins the run's cgroup itself (writing "0" to the cgroup.procs files the host
 * opened and passed). H does the run's setup (its rseq area registered again, the
 * namespace's uid and gid maps, its cgroup, mounts, hostname, loopback, a cgroup
 * namespace, a new session, every capability dropped, no_new_privs, the seccomp filter),
 * then jumps back into zy_spawn's frame, which returns 0 to Python (zy_serve then puts
 * its fds in place): H goes on as if the zygote's call had returned there, as fork() returns 0.
 * G lets the zygote go on, joins the cgroup, closes every fd but the status pipe, drops its
 * capabilities and reaps until H ends; then it kills and reaps what is left and writes H's status.
 *
 * While G lives it shares the zygote's memory, so after the fork it makes raw system calls
 * only (no libc: errno and every lock of libc are the zygote's) and touches nothing but
 * its own stack. All signals are blocked in G (as pid 1 of its namespace nothing from the
 * run could reach it anyway); the host ends it with SIGKILL through a pidfd.
 *
 * Standard C and Linux headers only; built by the server with the host's C compiler
 * (native.py). x86_64 and aarch64.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h> /* glibc 2.35+, which registers every thread for rseq */
#define ZY_RSEQ 1
#endif
#endif

#define ZY_STACK (256 * 1024)
#define ZY_MAX_RLIMITS 16
#define ZY_MAX_CGROUPS 8
#define ZY_MAX_FDS 64              /* fds one request carries */
#define ZY_MAX_TARGETS 16          /* fds the program gets at set numbers */
#define ZY_MAX_MESSAGE (1 << 16)   /* a request's bytes */
#define ZY_MAX_BPF 4096            /* BPF_MAXINSNS */

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_rseq
#define SYS_rseq 334
#endif

struct zy_request {
    /* set by the caller */
    int job_fd;       /* the run's end of the job socket: G writes 'c' (its credentials) */
    int status_fd;    /* G writes H's exit status here */
    int workspace_fd; /* a detached tmpfs: its work at /work, its tmp at /tmp */
    int n_cgroup_fds;
    int cgroup_fds[ZY_MAX_CGROUPS]; /* the run's cgroup.procs files, opened by the host */
    int n_rlimits;
    int rlimit_which[ZY_MAX_RLIMITS];
    unsigned long long rlimit_value[ZY_MAX_RLIMITS];
    char uid_map[64];
    char gid_map[64];
    char hostname[64];
    const void *bpf; /* struct sock_filter[bpf_len], or NULL */
    unsigned int bpf_len;
    /* set by zy_spawn */
    void *stack;          /* G's: zy_serve unmaps it (ZY_STACK bytes) once G is reaped */
    char error[160];      /* why a setup step failed, when zy_spawn returns < 0 */
    /* private */
    void *jump[5];        /* __builtin_setjmp: where H resumes */
    sigset_t mask;        /* the caller's signal mask, H's again before it resumes */
    int sync[2];          /* G -> zygote: H has been forked */
};

/* ---- raw system calls (G, while it shares the zygote's memory) ---------------------- */

static long raw6(long n, long a, long b, long c, long d, long e, long f) {
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory");
    return x0;
#else
#error "zygote_native.c: x86_64 or aarch64 only"
#endif
}

#define RAW(n, a, b, c) raw6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)

static size_t raw_strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

/* "zygote: WHAT" or "zygote: WHAT: DETAIL" on stderr, with raw calls only (G says it
   too). */
static void zy_say(const char *what, const char *detail) {
    char line[300];
    size_t n = 0;
    for (const char *p = "zygote: "; *p; p++) line[n++] = *p;
    for (const char *p = what; *p && n < sizeof line - 100; p++) line[n++] = *p;
    if (detail != NULL) {
        line[n++] = ':';
        line[n++] = ' ';
        for (const char *p = detail; *p && n < sizeof line - 2; p++) line[n++] = *p;
    }
    line[n++] = '\n';
    RAW(SYS_write, 2, line, n);
}

/* WHAT, with "errno N" when ``err`` is one (< 0). */
static void raw_say(const char *what, long err) {
    if (err >= 0) {
        zy_say(what, NULL);
        return;
    }
    char detail[32], digits[24];
    size_t n = 0;
    int d = 0;
    for (const char *p = "errno "; *p; p++) detail[n++] = *p;
    unsigned long v = (unsigned long)-err;
    do digits[d++] = (char)('0' + v % 10), v /= 10; while (v && d < 20);
    while (d) detail[n++] = digits[--d];
    detail[n] = 0;
    zy_say(what, detail);
}

static void __attribute__((noreturn)) raw_exit(int code) {
    for (;;) RAW(SYS_exit, code, 0, 0);
}

static void raw_fail(const char *what, long err) {
    if (err < 0) {
        raw_say(what, err);
        raw_exit(126);
    }
}

static long raw_write_file(const char *path, const char *text) {
    long fd = raw6(SYS_openat, AT_FDCWD, (long)path, O_WRONLY | O_CLOEXEC, 0, 0, 0);
    if (fd < 0) return fd;
    long n = RAW(SYS_write, fd, text, raw_strlen(text));
    RAW(SYS_close, fd, 0, 0);
    return n < 0 ? n : 0;
}

static void raw_drop_capabilities(void) {
    for (long cap = 0; raw6(SYS_prctl, PR_CAPBSET_DROP, cap, 0, 0, 0, 0) == 0; cap++) {
    }
    raw_fail("PR_CAP_AMBIENT_CLEAR_ALL",
             raw6(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, 0));
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) data[i].effective = data[i].permitted = data[i].inheritable = 0;
    raw_fail("capset", RAW(SYS_capset, &header, data, 0));
    raw_fail("PR_SET_NO_NEW_PRIVS", raw6(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0));
}

/* ---- H: the program's process, a copy of the zygote in its own memory (libc is fine) -- */

static void h_fail(const char *what) {
    raw_say(what, -(long)errno);
    _exit(126);
}

static void h_check(long result, const char *what) {
    if (result < 0) h_fail(what);
}

static void h_workspace(int workspace) {
    /* The detached tmpfs: its work at /work, its tmp at /tmp, its root nowhere (attached
       at /work just long enough to clone the two, then detached). */
    h_check(syscall(SYS_move_mount, workspace, "", AT_FDCWD, "/work", 4 /* F_EMPTY_PATH */),
            "attach the workspace");
    close(workspace);
    int work = (int)syscall(SYS_open_tree, AT_FDCWD, "/work/work", 1 | O_CLOEXEC);
    h_check(work, "clone /work/work");
    int tmp = (int)syscall(SYS_open_tree, AT_FDCWD, "/work/tmp", 1 | O_CLOEXEC);
    h_check(tmp, "clone /work/tmp");
    h_check(umount2("/work", MNT_DETACH), "detach the workspace root");
    h_check(syscall(SYS_move_mount, work, "", AT_FDCWD, "/work", 4), "attach /work");
    h_check(syscall(SYS_move_mount, tmp, "", AT_FDCWD, "/tmp", 4), "attach /tmp");
    close(work);
    close(tmp);
}

static void h_proc(void) {
    unsigned long flags = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    h_check(mount("proc", "/proc", "proc", flags, NULL), "mount /proc");
    static const char *const covered[] = {"/proc/sys", "/proc/sysrq-trigger", "/proc/irq",
                                          "/proc/bus"}; /* what bwrap covers, as it does */
    for (size_t i = 0; i < sizeof covered / sizeof *covered; i++) {
        const char *path = covered[i];
        if (access(path, W_OK) != 0) continue;
        h_check(mount(path, path, NULL, MS_BIND | MS_REC, NULL), path);
        h_check(mount(path, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, NULL), path);
    }
}

static void h_loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    h_check(s, "loopback socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    h_check(ioctl(s, SIOCGIFFLAGS, &ifr), "SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    h_check(ioctl(s, SIOCSIFFLAGS, &ifr), "SIOCSIFFLAGS");
    close(s);
}

static void h_rseq(void) {
#ifdef ZY_RSEQ
    /* glibc registered the zygote's thread for restartable sequences (sched_getcpu()
       reads the CPU from that area). The kernel drops the registration for a CLONE_VM
       clone (G) and so for G's fork (H), whose glibc still reads its copy of the area:
       the CPU of the moment of the fork, ever after. Register H's copy, as glibc does at
       any process's start (32: the original size, which every kernel takes). */
    if (__rseq_size == 0) return; /* glibc did not register (disabled, or no kernel support) */
    char *tp;
#if defined(__x86_64__)
    __asm__("mov %%fs:0, %0" : "=r"(tp)); /* the thread pointer (the TCB's own address) */
#else
    __asm__("mrs %0, tpidr_el0" : "=r"(tp));
#endif
    char *area = tp + __rseq_offset;
    unsigned int size = __rseq_size > 32 ? __rseq_size : 32;
    if (syscall(SYS_rseq, area, size, 0, RSEQ_SIG) != 0)
        (void)syscall(SYS_rseq, area, 32, 0, RSEQ_SIG);
#endif
}

static void h_setup(struct zy_request *req) {
    close(req->sync[1]);
    h_rseq();
    /* G cannot map the namespace's ids: it shares the zygote's memory, which is not
       dumpable, so its /proc files are not its own. H's copy is made dumpable (as any
       process is; nothing else of the run exists yet) and writes them for both. */
    h_check(prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE");
    raw_fail("setgroups", raw_write_file("/proc/self/setgroups", "deny"));
    raw_fail("uid_map", raw_write_file("/proc/self/uid_map", req->uid_map));
    raw_fail("gid_map", raw_write_file("/proc/self/gid_map", req->gid_map));
    /* into the run's cgroup before anything else (what it forks inherits it) */
    for (int i = 0; i < req->n_cgroup_fds && i < ZY_MAX_CGROUPS; i++) {
        raw_fail("join the run's cgroup", RAW(SYS_write, req->cgroup_fds[i], "0", 1));
        close(req->cgroup_fds[i]);
    }
    h_check(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), "make / private");
    h_workspace(req->workspace_fd);
    h_proc();
    h_check(sethostname(req->hostname, strlen(req->hostname)), "sethostname");
    h_loopback_up();
    h_check(unshare(CLONE_NEWCGROUP), "unshare cgroup");
    h_check(setsid(), "setsid");
    raw_drop_capabilities();
    if (req->bpf != NULL) {
        struct sock_fprog prog = {(unsigned short)req->bpf_len, (struct sock_filter *)req->bpf};
        h_check(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0), "seccomp filter");
    }
    pthread_sigmask(SIG_SETMASK, &req->mask, NULL);
}

/* ---- G: pid 1 of the run, in the zygote's memory ------------------------------------- */

static int g_main(void *arg) {
    struct zy_request *req = arg;
    RAW(SYS_close, req->sync[0], 0, 0);
    raw_fail("PR_SET_PDEATHSIG", raw6(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0, 0));
    for (int i = 0; i < req->n_rlimits && i < ZY_MAX_RLIMITS; i++) {
        struct rlimit64 {
            unsigned long long cur, max;
        } limit = {req->rlimit_value[i], req->rlimit_value[i]};
        raw_fail("setrlimit", raw6(SYS_prlimit64, 0, req->rlimit_which[i], (long)&limit, 0, 0, 0));
    }
    int status_fd = req->status_fd, job_fd = req->job_fd;
    /* libc's fork: H gets libc's own child-side care (its locks, its tid). The zygote
       is stopped in zy_spawn meanwhile, holding none of them; nothing can kill G before
       it returns (the host learns G's pid only after it, and G is in no cgroup of a run
       yet): a G killed inside it would leave the zygote's malloc locks taken. */
    int go[2]; /* G -> H: G reported (its byte comes first on the job socket) */
    raw_fail("pipe2", RAW(SYS_pipe2, go, O_CLOEXEC, 0));
    pid_t h = fork();
    if (h == 0) {
        char byte;
        close(go[1]);
        if (read(go[0], &byte, 1) != 1) _exit(125); /* G is gone */
        close(go[0]);
        h_setup(req);
        __builtin_longjmp(req->jump, 1); /* into zy_spawn, returning 0 there */
    }
    if (h < 0) raw_fail("fork", -1);
    /* From here on the zygote runs again: raw calls and our own stack only. */
    int cgroup_fds[ZY_MAX_CGROUPS], n_cgroup_fds = 0;
    for (int i = 0; i < req->n_cgroup_fds && i < ZY_MAX_CGROUPS; i++)
        cgroup_fds[n_cgroup_fds++] = req->cgroup_fds[i];
    RAW(SYS_write, req->sync[1], "h", 1);
    if (RAW(SYS_write, job_fd, "c", 1) != 1) raw_exit(125); /* the host gave up */
    RAW(SYS_write, go[1], "g", 1);
    /* "0": the writer itself, G alone (its own thread group). The fd was opened by the
       host (root), whose credentials the kernel checks; in v1 the move may wait for an
       RCU grace period: H makes its own move meanwhile. */
    for (int i = 0; i < n_cgroup_fds; i++)
        raw_fail("join the run's cgroup", RAW(SYS_write, cgroup_fds[i], "0", 1));
    RAW(SYS_close_range, 0, status_fd - 1, 0);
    RAW(SYS_close_range, status_fd + 1, ~0U, 0);
    raw_drop_capabilities();
    int status = 0, code = 125;
    for (;;) { /* the namespace's init: reap everything, end with the program */
        long child = raw6(SYS_wait4, -1, (long)&status, 0, 0, 0, 0);
        if (child == h) break;
        if (child == -ECHILD) raw_exit(125);
    }
    code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    /* kill and reap every other process of the namespace (those the program left behind
       are ours by now, or will be once their parents are reaped): when G reports, G is
       all that is left of the run */
    for (;;) {
        RAW(SYS_kill, -1, SIGKILL, 0);
        if (raw6(SYS_wait4, -1, (long)&status, 0, 0, 0, 0) == -ECHILD) break;
    }
    char text[8];
    int n = 0;
    if (code >= 100) text[n++] = (char)('0' + code / 100);
    if (code >= 10) text[n++] = (char)('0' + code / 10 % 10);
    text[n++] = (char)('0' + code % 10);
    text[n++] = '\n';
    RAW(SYS_write, status_fd, text, n);
    raw_exit(code);
}

/* ---- the zygote's call --------------------------------------------------------------- */

/* G's pid (> 0) in the zygote; 0 in H (its setup done); -errno when no G could be made
   (req->error says which step). Signals stay blocked in the zygote for the call. */
long zy_spawn(struct zy_request *req) {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &req->mask);
    req->stack = NULL;
    req->error[0] = 0;
    if (pipe2(req->sync, O_CLOEXEC) != 0) {
        long err = -errno;
        strcpy(req->error, "pipe2");
        pthread_sigmask(SIG_SETMASK, &req->mask, NULL);
        return err;
    }
    void *stack = mmap(NULL, ZY_STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) {
        long err = -errno;
        strcpy(req->error, "mmap");
        close(req->sync[0]);
        close(req->sync[1]);
        pthread_sigmask(SIG_SETMASK, &req->mask, NULL);
        return err;
    }
    if (__builtin_setjmp(req->jump)) {
        return 0; /* H: h_setup done, its signal mask restored */
    }
    int flags = CLONE_VM | CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET |
                CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD;
    pid_t g = clone(g_main, (char *)stack + ZY_STACK, flags, req);
    long err = g < 0 ? -errno : 0;
    close(req->sync[1]);
    if (g < 0) {
        strcpy(req->error, "clone");
        close(req->sync[0]);
        munmap(stack, ZY_STACK);
        pthread_sigmask(SIG_SETMASK, &req->mask, NULL);
        return err;
    }
    char byte;
    while (read(req->sync[0], &byte, 1) < 0 && errno == EINTR) {
    }
    /* ('h', or the end of the pipe: G failed before the fork and is exiting) */
    close(req->sync[0]);
    req->stack = stack;
    pthread_sigmask(SIG_SETMASK, &req->mask, NULL);
    return g;
}

/* ---- the zygote's loop ---------------------------------------------------------------- */

/* Serving requests in C leaves the zygote's Python objects alone: each page the zygote
   writes after a fork is copied while a run forked before still shares it, and a loop in
   Python (the request parsed into a dict, a ctypes structure built, a signal handler
   run per exit) wrote about a hundred pages per run. Called with the GIL held (through
   ctypes.PyDLL): the interpreter's fork hooks are called around each fork, as os.fork()
   calls them. */

struct zy_run {
    pid_t pid;   /* G */
    int pidfd;   /* readable once G has ended; -1 if none could be had */
    void *stack; /* its stack, unmapped once it is reaped */
};

/* Pidfds kept at most: the rest of the zygote's fds (RLIMIT_NOFILE is the runs') must
   stay free for the fds each request brings; a run beyond it is reaped at a request. */
#define ZY_MAX_PIDFDS 256

static struct zy_run *zy_runs;
static size_t zy_n_runs, zy_cap_runs;
static struct pollfd *zy_polled;
static size_t zy_cap_polled;

/* Reap every run's init that has ended; unmap its stack. */
static void zy_reap(void) {
    for (;;) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid <= 0) return;
        for (size_t i = 0; i < zy_n_runs; i++) {
            if (zy_runs[i].pid == pid) {
                munmap(zy_runs[i].stack, ZY_STACK);
                if (zy_runs[i].pidfd >= 0) close(zy_runs[i].pidfd);
                zy_runs[i] = zy_runs[--zy_n_runs];
                break;
            }
        }
    }
}

static int zy_remember(pid_t pid, void *stack) {
    if (zy_n_runs == zy_cap_runs) {
        size_t cap = zy_cap_runs ? 2 * zy_cap_runs : 64;
        struct zy_run *grown = realloc(zy_runs, cap * sizeof *grown);
        if (grown == NULL) return -1;
        zy_runs = grown;
        zy_cap_runs = cap;
    }
    int pidfd = -1;
    size_t watched = 0;
    for (size_t i = 0; i < zy_n_runs; i++) watched += zy_runs[i].pidfd >= 0;
    if (watched < ZY_MAX_PIDFDS) pidfd = (int)syscall(SYS_pidfd_open, pid, 0); /* cloexec */
    zy_runs[zy_n_runs].pid = pid;
    zy_runs[zy_n_runs].pidfd = pidfd < 0 ? -1 : pidfd;
    zy_runs[zy_n_runs].stack = stack;
    zy_n_runs++;
    return 0;
}

/* Until a request is there (or the host's end): 0; -errno. The runs' inits that end
   meanwhile are reaped as they end (their pidfds), so that no zombie waits for the next
   request. */
static int zy_wait(int control) {
    for (;;) {
        zy_reap();
        size_t n = 1 + zy_n_runs;
        if (n > zy_cap_polled) {
            struct pollfd *grown = realloc(zy_polled, 2 * n * sizeof *grown);
            if (grown == NULL) return 0; /* (recvmsg waits; the rest at the next request) */
            zy_polled = grown;
            zy_cap_polled = 2 * n;
        }
        zy_polled[0].fd = control;
        zy_polled[0].events = POLLIN;
        for (size_t i = 0; i < zy_n_runs; i++) {
            zy_polled[1 + i].fd = zy_runs[i].pidfd; /* (-1: ignored by poll) */
            zy_polled[1 + i].events = POLLIN;
        }
        if (poll(zy_polled, n, -1) < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (zy_polled[0].revents) return 0;
    }
}

/* A request: "key=value" lines, a blank line, the BPF program; the fds by index. */
struct zy_parsed {
    int job_at;                      /* job_fd=N: the job socket's number in the program */
    int n_named;
    const char *name[ZY_MAX_FDS];    /* fd.NAME=I */
    int fd[ZY_MAX_FDS];
    int n_targets;
    int target[ZY_MAX_TARGETS];      /* target.N=NAME: the program's fd N is NAME's */
    const char *target_name[ZY_MAX_TARGETS];
};

static int zy_number(const char *text, long long *out) {
    char *end;
    if (*text == 0) return -1;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (*end != 0 || errno != 0) return -1;
    *out = value;
    return 0;
}

static int zy_fd_of(const struct zy_parsed *parsed, const char *name) {
    for (int i = 0; i < parsed->n_named; i++)
        if (strcmp(parsed->name[i], name) == 0) return parsed->fd[i];
    return -1;
}

static struct sock_filter zy_bpf[ZY_MAX_BPF];

/* NULL when the request is one the zygote can make a run of; else why not. */
static const char *zy_parse(char *data, size_t size, const int *fds, int n_fds,
                            struct zy_request *req, struct zy_parsed *parsed) {
    char *header = data, *bpf = data + size, *end = data + size;
    for (char *p = data; p + 1 < end; p++) {
        if (p[0] == '\n' && p[1] == '\n') {
            *p = 0;
            bpf = p + 2;
            break;
        }
    }
    if (bpf == end) *end = 0; /* no program: the whole message is the header */
    memset(parsed, 0, sizeof *parsed);
    parsed->job_at = -1;
    req->hostname[0] = 0;
    for (char *line = header; line != NULL && *line;) {
        char *next = strchr(line, '\n');
        if (next != NULL) *next++ = 0;
        char *value = strchr(line, '=');
        if (value == NULL) return "a line without '='";
        *value++ = 0;
        long long number;
        if (strcmp(line, "hostname") == 0) {
            if (strlen(value) >= sizeof req->hostname) return "hostname too long";
            strcpy(req->hostname, value);
        } else if (strcmp(line, "job_fd") == 0) {
            if (zy_number(value, &number) != 0 || number < 0 || number > 1 << 20)
                return "bad job_fd";
            parsed->job_at = (int)number;
        } else if (strncmp(line, "fd.", 3) == 0) {
            if (zy_number(value, &number) != 0 || number < 0 || number >= n_fds)
                return "an fd index out of range";
            if (parsed->n_named == ZY_MAX_FDS) return "too many fds";
            parsed->name[parsed->n_named] = line + 3;
            parsed->fd[parsed->n_named++] = fds[number];
        } else if (strncmp(line, "target.", 7) == 0) {
            if (zy_number(line + 7, &number) != 0 || number < 0 || number > 1 << 20)
                return "bad target";
            if (parsed->n_targets == ZY_MAX_TARGETS) return "too many targets";
            parsed->target[parsed->n_targets] = (int)number;
            parsed->target_name[parsed->n_targets++] = value;
        } else if (strncmp(line, "rlimit.", 7) == 0) {
            long long which;
            char *rest;
            errno = 0;
            unsigned long long limit = strtoull(value, &rest, 10);
            if (zy_number(line + 7, &which) != 0 || *value == 0 || *rest != 0 || errno != 0)
                return "bad rlimit";
            if (req->n_rlimits == ZY_MAX_RLIMITS)
                return "more cgroups or rlimits than a request holds";
            req->rlimit_which[req->n_rlimits] = (int)which;
            req->rlimit_value[req->n_rlimits++] = limit;
        }
        line = next;
    }
    req->job_fd = zy_fd_of(parsed, "job");
    req->status_fd = zy_fd_of(parsed, "status");
    req->workspace_fd = zy_fd_of(parsed, "workspace");
    if (req->job_fd < 0 || req->status_fd < 0 || req->workspace_fd < 0 || parsed->job_at < 0)
        return "no job, status or workspace fd";
    for (int i = 0; i < parsed->n_named; i++) {
        if (strncmp(parsed->name[i], "cgroup", 6) != 0) continue;
        if (req->n_cgroup_fds == ZY_MAX_CGROUPS)
            return "more cgroups or rlimits than a request holds";
        req->cgroup_fds[req->n_cgroup_fds++] = parsed->fd[i];
    }
    for (int i = 0; i < parsed->n_targets; i++)
        if (zy_fd_of(parsed, parsed->target_name[i]) < 0) return "a target names no fd";
    size_t bpf_size = (size_t)(end - bpf);
    if (bpf_size % sizeof(struct sock_filter) != 0 || bpf_size > sizeof zy_bpf)
        return "a BPF program of a bad size";
    if (bpf_size > 0) {
        memcpy(zy_bpf, bpf, bpf_size); /* (aligned) */
        req->bpf = zy_bpf;
        req->bpf_len = (unsigned int)(bpf_size / sizeof(struct sock_filter));
    }
    return NULL;
}

/* H: the fds of a program bwrap would have started (the targets at their numbers, nothing
   else) and /work as its cwd. */
static void zy_program_fds(const struct zy_parsed *parsed, int high) {
    int moved[ZY_MAX_TARGETS], order[ZY_MAX_TARGETS];
    for (int i = 0; i < parsed->n_targets; i++) {
        if (parsed->target[i] >= high) high = parsed->target[i] + 1;
    }
    for (int i = 0; i < parsed->n_targets; i++) { /* above every number first */
        moved[i] = fcntl(zy_fd_of(parsed, parsed->target_name[i]), F_DUPFD_CLOEXEC, high);
        h_check(moved[i], "move an fd");
    }
    for (int i = 0; i < parsed->n_targets; i++)
        h_check(dup2(moved[i], parsed->target[i]), "place an fd"); /* inheritable */
    int n = parsed->n_targets;
    for (int i = 0; i < n; i++) order[i] = parsed->target[i];
    for (int i = 1; i < n; i++) /* (insertion sort: a handful) */
        for (int j = i; j > 0 && order[j - 1] > order[j]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    unsigned int start = 0;
    for (int i = 0; i < n; i++) {
        if (start < (unsigned int)order[i])
            h_check(syscall(SYS_close_range, start, order[i] - 1, 0), "close_range");
        start = (unsigned int)order[i] + 1;
    }
    h_check(syscall(SYS_close_range, start, ~0U, 0), "close_range");
    h_check(chdir("/work"), "chdir /work");
}

/* Serve fork requests on ``control`` until the host closes it: 1 then; -errno when it
   cannot be read; 0 in each run (H), its setup done, its fds in place (``*job_at`` its
   job socket's number). */
long zy_serve(int control, void (*before)(void), void (*parent)(void), void (*child)(void),
              int *job_at) {
    static char data[ZY_MAX_MESSAGE + 1];
    static struct zy_request req;
    static struct zy_parsed parsed;
    union {
        char space[CMSG_SPACE(ZY_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control_data;
    char detail[200];
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return -errno;
    /* G shares our memory: nothing of the run may read it (ptrace, /proc/1/mem); H, which
       gets a copy, makes itself dumpable again (as any process is). */
    char uid_map[64], gid_map[64];
    int uid = (int)getuid(), gid = (int)getgid();
    snprintf(uid_map, sizeof uid_map, "%d %d 1", uid, uid);
    snprintf(gid_map, sizeof gid_map, "%d %d 1", gid, gid);
    for (;;) {
        int waited = zy_wait(control);
        if (waited < 0) return waited;
        struct iovec iov = {data, ZY_MAX_MESSAGE};
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control_data.space;
        msg.msg_controllen = sizeof control_data.space;
        ssize_t size = recvmsg(control, &msg, MSG_CMSG_CLOEXEC);
        if (size < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (size == 0) return 1; /* the host is gone or closed us */
        int fds[ZY_MAX_FDS], n_fds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < count && n_fds < ZY_MAX_FDS; i++)
                memcpy(&fds[n_fds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
        memset(&req, 0, sizeof req);
        const char *bad = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
                              ? "a request larger than the zygote takes"
                              : zy_parse(data, (size_t)size, fds, n_fds, &req, &parsed);
        if (bad != NULL) {
            /* (none may be left out; the host sees the job socket close: no sandbox) */
            zy_say(bad, NULL);
        } else {
            strcpy(req.uid_map, uid_map);
            strcpy(req.gid_map, gid_map);
            before();
            long pid = zy_spawn(&req);
            if (pid == 0) { /* H */
                child();
                int high = control + 1;
                for (int i = 0; i < n_fds; i++)
                    if (fds[i] >= high) high = fds[i] + 1;
                zy_program_fds(&parsed, high);
                *job_at = parsed.job_at;
                return 0;
            }
            parent();
            if (pid > 0) {
                if (zy_remember((pid_t)pid, req.stack) != 0) zy_say("no memory", NULL);
            } else {
                snprintf(detail, sizeof detail, "%s", strerror((int)-pid));
                zy_say(req.error, detail);
            }
        }
        for (int i = 0; i < n_fds; i++) close(fds[i]); /* (closed already if attached) */
    }
}
