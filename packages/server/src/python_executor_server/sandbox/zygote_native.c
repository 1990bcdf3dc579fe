/* The zygote's native part (see _zygote_main.py and zygote.py): one call, zy_spawn, makes a
 * run's two processes, G (pid 1 of the run's namespaces) and H (pid 2, the program), at the
 * price of one copy of the interpreter instead of two.
 *
 *   zygote --clone(CLONE_VM | new namespaces)--> G --fork--> H
 *
 * G shares the zygote's memory (no page tables copied, nothing copied on write, nothing to
 * tear down at its exit) and runs only the C below on a stack of its own. It sets the run's
 * rlimits, reports (its credentials tell the host its pid) and forks H while the zygote
 * waits inside zy_spawn: H is a copy of an interpreter stopped at a known point. Each of G
 * and H joins the run's cgroup itself (writing "0" to the cgroup.procs files the host
 * opened and passed). H does the run's setup (the namespace's uid and gid maps, its
 * cgroup, mounts, hostname, loopback, a cgroup namespace, a new session, every capability
 * dropped, no_new_privs, the seccomp filter), then jumps back into zy_spawn's frame, which
 * returns
 * 0 to Python: H goes on as if the zygote's call had returned there, as fork() returns 0.
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
#include <sched.h>
#include <signal.h>
#include <stdint.h>
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

#define ZY_STACK (256 * 1024)
#define ZY_MAX_RLIMITS 16
#define ZY_MAX_CGROUPS 8

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
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
    void *stack;          /* G's: the caller unmaps it (zy_stack_size bytes) once G is reaped */
    char error[160];      /* why a setup step failed, when zy_spawn returns < 0 */
    /* private */
    void *jump[5];        /* __builtin_setjmp: where H resumes */
    sigset_t mask;        /* the caller's signal mask, H's again before it resumes */
    int sync[2];          /* G -> zygote: H has been forked */
};

unsigned long zy_stack_size(void) { return ZY_STACK; }
unsigned long zy_request_size(void) { return sizeof(struct zy_request); }

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

static void raw_say(const char *what, long err) {
    char line[200];
    size_t n = 0;
    const char *prefix = "zygote: ";
    for (const char *p = prefix; *p && n < sizeof line - 40; p++) line[n++] = *p;
    for (const char *p = what; *p && n < sizeof line - 40; p++) line[n++] = *p;
    if (err < 0) {
        char digits[24];
        int d = 0;
        unsigned long v = (unsigned long)-err;
        const char *mid = ": errno ";
        for (const char *p = mid; *p; p++) line[n++] = *p;
        do digits[d++] = (char)('0' + v % 10), v /= 10; while (v && d < 20);
        while (d) line[n++] = digits[--d];
    }
    line[n++] = '\n';
    RAW(SYS_write, 2, line, n);
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

static void h_setup(struct zy_request *req) {
    close(req->sync[1]);
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
