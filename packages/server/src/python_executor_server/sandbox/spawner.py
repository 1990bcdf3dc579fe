"""posix_spawn on a thread of its own, off the event loop.

Spawning bwrap blocks the caller until the child has exec'd (vfork): half a
millisecond on a quiet host, two on a busy one, for every sandbox. ``os.posix_spawn``
holds the GIL meanwhile, so even from another thread it would stall the event loop;
libc's ``posix_spawn`` called through ctypes releases it. The thread lives as long as
the ``Spawner``: bwrap's ``--die-with-parent`` watches the *thread* that spawned it
(PR_SET_PDEATHSIG), so sandboxes must never be started from a worker thread that
may exit while they run.

Usage::

    spawner = Spawner()
    child = await spawner.spawn(argv, {0: stdin_r, 1: out_w, 2: err_w}, env={})
    spawner.close()                  # after every sandbox it started is gone
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from .process import Child, fd_actions

# posix_spawnattr_setflags bits (the same in glibc and musl)
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08
_SETSID = 0x80
_OPAQUE = 1024  # bytes for posix_spawn_file_actions_t / posix_spawnattr_t / sigset_t: ample

_libc = ctypes.CDLL(None, use_errno=True)
_vp, _int = ctypes.c_void_p, ctypes.c_int
for _name, _args in {
    "posix_spawn_file_actions_init": [_vp],
    "posix_spawn_file_actions_destroy": [_vp],
    "posix_spawn_file_actions_adddup2": [_vp, _int, _int],
    "posix_spawn_file_actions_addclose": [_vp, _int],
    "posix_spawnattr_init": [_vp],
    "posix_spawnattr_destroy": [_vp],
    "posix_spawnattr_setflags": [_vp, ctypes.c_short],
    "posix_spawnattr_setsigmask": [_vp, _vp],
    "posix_spawnattr_setsigdefault": [_vp, _vp],
    "sigemptyset": [_vp],
    "sigaddset": [_vp, _int],
    "posix_spawn": [_vp, ctypes.c_char_p, _vp, _vp, _vp, _vp],
}.items():
    getattr(_libc, _name).argtypes = _args
    getattr(_libc, _name).restype = _int


class Spawner:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")

    async def spawn(self, argv: list[str], fds: Mapping[int, int], env: Mapping[str, str]) -> Child:
        """Start ``argv`` in a new session with ``fds`` (child fd -> our fd) and nothing
        else open; SIGPIPE and SIGXFSZ back to their defaults (Python ignores them)."""
        loop = asyncio.get_running_loop()
        pid = await loop.run_in_executor(self._thread, _spawn, argv, dict(fds), dict(env))
        return Child(pid)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _spawn(argv: Sequence[str], fds: Mapping[int, int], env: Mapping[str, str]) -> int:
    actions = ctypes.create_string_buffer(_OPAQUE)
    attr = ctypes.create_string_buffer(_OPAQUE)
    _check(_libc.posix_spawn_file_actions_init(actions))
    try:
        _check(_libc.posix_spawnattr_init(attr))
        try:
            return _call(argv, env, fds, actions, attr)
        finally:
            _libc.posix_spawnattr_destroy(attr)
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)


def _call(
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: Mapping[int, int],
    actions: ctypes.Array[ctypes.c_char],
    attr: ctypes.Array[ctypes.c_char],
) -> int:
    for action in fd_actions(fds):
        if len(action) == 3:
            _check(_libc.posix_spawn_file_actions_adddup2(actions, action[1], action[2]))
        else:
            _check(_libc.posix_spawn_file_actions_addclose(actions, action[1]))
    empty, default = ctypes.create_string_buffer(_OPAQUE), ctypes.create_string_buffer(_OPAQUE)
    _libc.sigemptyset(empty)
    _libc.sigemptyset(default)
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        _libc.sigaddset(default, signum)
    _check(_libc.posix_spawnattr_setsigmask(attr, empty))
    _check(_libc.posix_spawnattr_setsigdefault(attr, default))
    _check(_libc.posix_spawnattr_setflags(attr, _SETSIGDEF | _SETSIGMASK | _SETSID))
    pid = _int()
    path = os.fsencode(argv[0])
    envp = _strings([f"{key}={value}" for key, value in env.items()])
    err = _libc.posix_spawn(ctypes.byref(pid), path, actions, attr, _strings(argv), envp)
    if err:
        raise OSError(err, f"posix_spawn {argv[0]}: {os.strerror(err)}")
    return pid.value


def _strings(items: Sequence[str]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated ``char *[]`` (ctypes keeps the bytes alive with the array)."""
    encoded = [os.fsencode(item) for item in items]
    return (ctypes.c_char_p * (len(encoded) + 1))(*encoded, None)


def _check(err: int) -> None:
    if err:
        raise OSError(err, os.strerror(err))
