"""What a worker process gives up before it reads the scientist's first action.

Applied by the worker to itself after importing torch (the only time it needs files), and
before any untrusted input: no new files or file growth, few descriptors, no core dumps,
a fixed number of compute threads, and, where the kernel and libseccomp allow, a seccomp
filter that refuses new processes, sockets, program execution, writable opens and changes
to its own limits (with ``no_new_privs``). The monitor sets the address-space limit from
outside (``prlimit``), so the worker cannot choose it.

Without libseccomp (another OS, or the library missing) the worker runs with the resource
limits alone and says so in the monitor's log: the allowlist, the monitor's labels and the
OS memory and time limits still hold, but a memory-corruption bug in torch would then not
be contained by the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

log = logging.getLogger(__name__)

_DENIED_SYSCALLS = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv",
    "process_vm_writev", "setrlimit", "prlimit64", "mkdir", "mkdirat", "unlink",
    "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink",
    "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown", "fchownat", "truncate",
    "ftruncate", "mount", "umount2", "chroot", "pivot_root", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "kill", "tkill", "memfd_create",
    "io_uring_setup", "bpf", "perf_event_open", "init_module", "finit_module",
    "kexec_load", "reboot", "swapon", "swapoff", "personality", "userfaultfd", "clone3",
)  # fmt: skip
"""Refused with EPERM (clone3 with ENOSYS, so glibc falls back to clone, checked below)."""

_CLONE_THREAD = 0x00010000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def limit_resources(max_open_files: int = 256) -> None:
    """No files written or grown, no core dumps, few descriptors."""
    for name, value in (
        ("RLIMIT_FSIZE", 0),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NOFILE", max_open_files),
    ):
        limit = getattr(resource, name, None)
        if limit is not None:
            resource.setrlimit(limit, (value, value))


def install_seccomp() -> str:
    """Install the system-call filter; returns "seccomp" or why it is not in force."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as exc:  # the package, or libseccomp itself, is missing
        return f"no seccomp ({type(exc).__name__}: {exc})"
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        eperm = seccomp.ERRNO(errno.EPERM)
        for name in _DENIED_SYSCALLS:
            action = seccomp.ERRNO(errno.ENOSYS) if name == "clone3" else eperm
            try:
                rules.add_rule(action, name)
            except (OSError, RuntimeError, ValueError):
                continue  # a call this architecture does not have
        # clone: threads only (CLONE_THREAD set); a new process is refused.
        rules.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
        # open/openat: read-only; creating, truncating or writing is refused.
        for name, index in (("open", 1), ("openat", 2)):
            for flag in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND):
                rules.add_rule(eperm, name, seccomp.Arg(index, seccomp.MASKED_EQ, flag, flag))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "openat2")
        rules.load()  # sets no_new_privs first (libseccomp's default)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"no seccomp (the kernel refused the filter: {exc})"
    return "seccomp"
