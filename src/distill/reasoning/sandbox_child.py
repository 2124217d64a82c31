"""The launcher `sandbox.py` starts with `python -I -S` (this file's compiled code and a config): it builds the namespaces
and mounts, then runs the untrusted program as an unprivileged user under resource limits.

It is run as a script, not imported, so it uses the standard library only. Why each step:
- unshare(user, pid, net, mount, ipc, uts): a private view of the machine that needs no root and no
  helper binary; in the new network namespace only a down loopback exists, so every connect fails.
- the parent (root) writes the uid map "0 -> U0, 1000 -> U" so the program's real uid outside is an
  unused, unprivileged one: it cannot touch root's files or processes, and RLIMIT_NPROC (ignored for
  root) applies to it and bounds a fork bomb. A caller that is not root maps itself and drops its
  namespace capabilities through a nested user namespace instead.
- every mount is remounted read-only and nosuid; /tmp, /var/tmp and /dev/shm get a private tmpfs that
  vanishes with the namespace; the program runs in /tmp/sandbox there (a copy of the work folder's
  main.py), so what it writes is bounded by the tmpfs size, not the disk.
- the program runs as pid 2 under our pid 1; when pid 1 exits (or is killed) the kernel kills every
  process left in the namespace, so nothing survives a run.
Messages to the parent go over the status pipe, one line each: "U" (ready for the uid map), "E <why>"
(setup failed), "S <wait status> <cpu seconds> <max rss KiB>" (the program finished).
"""

import ctypes
import marshal
import math
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
INNER_UID = 1000  # the program's uid inside the namespace
WORK = "/tmp/sandbox"  # where the program sees its work folder
SETUP_FAILED = 70

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = [None if x is None else x.encode() for x in (src, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")


def _write(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def _unescape(field):
    """mountinfo writes space, tab, newline and backslash as \\ooo octal."""
    head, *rest = field.split("\\")
    return head + "".join(chr(int(part[:3], 8)) + part[3:] for part in rest)


def _mountinfo():
    """(mount point, per-mount options) of every mount, parents before children."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            point = _unescape(parts[4])
            out.append((point, set(parts[5].split(","))))
    return out


def _readonly_everything():
    """Remount every mount read-only, nosuid and nodev (noexec kept where it was: a locked flag)."""
    for point, opts in _mountinfo():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        if "noexec" in opts:
            flags |= MS_NOEXEC
        try:
            _mount(None, point, None, flags)
        except SetupError:
            if "ro" in opts:  # already read-only: nothing to do
                continue
            if not os.path.exists(point):  # hidden by an over-mount, unreachable
                continue
            raise


def _private_tmpfs(point, size_mb, mode="1777", readonly=False):
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    _mount("tmpfs", point, "tmpfs", flags, f"size={size_mb}m,nr_inodes=4096,mode={mode}")


def _expose(hide, keep_fds):
    """Cover `hide` (a folder others cannot enter, e.g. /root) with a tmpfs and bind back, read-only,
    only the folders in `keep_fds` (path -> fd): the interpreter and its standard library."""
    _private_tmpfs(hide, 1, mode="755")
    for path in keep_fds:
        os.makedirs(path, mode=0o755, exist_ok=True)
    _mount(None, hide, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path, fd in keep_fds.items():
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_mounts(cfg, program, expose_fds):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _readonly_everything()
    tmp_mb = max(16, 8 * int(cfg["limits"]["file_mb"]))
    for point in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(point) and not os.path.islink(point):
            _private_tmpfs(point, tmp_mb)
    for hide, keep in cfg["expose"].items():
        _expose(hide, {path: expose_fds[path] for path in keep})
    # the work folder lives in the /tmp tmpfs, not on disk: what the program writes is bounded by its size
    os.mkdir(WORK, 0o700)
    with open(f"{WORK}/main.py", "wb") as fh:
        fh.write(program)
    if cfg["mode"] == "ns-parent":  # ns-self: the program's uid is ours already
        for path in (WORK, f"{WORK}/main.py"):
            os.chown(path, INNER_UID, INNER_UID)


def _map_self(pid="self", inside=0):
    """Map our own uid/gid to `inside` (all an unprivileged caller may do)."""
    uid, gid = os.geteuid(), os.getegid()
    _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/uid_map", f"{inside} {uid} 1\n")
    _write(f"/proc/{pid}/gid_map", f"{inside} {gid} 1\n")


def _set_limits(limits):
    cpu = max(1, math.ceil(float(limits["cpu_s"])))
    memory = int(limits["memory_mb"]) * 1024 * 1024
    fsize = int(limits["file_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["processes"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _exec_program(cfg, cwd):
    """Never returns: the program replaces this process."""
    exe = cfg["exe"]
    os.chdir(cwd)
    _set_limits(cfg["limits"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    status_fd = cfg["status_fd"]
    os.closerange(3, status_fd)  # the status pipe stays open only until exec, to report a failing exec
    os.closerange(status_fd + 1, 1 << 16)
    os.set_inheritable(status_fd, False)
    os.execve(exe, [exe, "-I", "-S", "main.py"], cfg["env"])


def _drop_to_program_user(mode):
    if mode == "ns-parent":  # the parent mapped INNER_UID to an unused uid outside
        os.setgroups([])
        os.setresgid(INNER_UID, INNER_UID, INNER_UID)
        os.setresuid(INNER_UID, INNER_UID, INNER_UID)
    else:  # a nested user namespace in which we are not root: exec drops every capability
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(user, nested)")
        _write("/proc/self/uid_map", f"{INNER_UID} 0 1\n")
        _write("/proc/self/gid_map", f"{INNER_UID} 0 1\n")


def _mount_own_proc():
    """A /proc listing only the namespace's processes. If refused, the host's stays (read-only), where
    the processes of other uids still cannot be read."""
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        return False
    return True


def _pid1(cfg, status_fd):
    """Pid 1 of the namespace: mount its /proc, start the program as pid 2, reap orphans, report."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _mount_own_proc()
    child = os.fork()
    if child == 0:
        try:
            _drop_to_program_user(cfg["mode"])
            _exec_program(cfg, WORK)
        except BaseException as exc:
            os.write(status_fd, f"E program start: {exc}\n".encode())
        os._exit(SETUP_FAILED)
    while True:
        pid, status, usage = os.wait4(-1, 0)
        if pid == child:
            cpu = usage.ru_utime + usage.ru_stime
            os.write(status_fd, f"S {status} {cpu:.3f} {usage.ru_maxrss}\n".encode())
            os._exit(0)  # the kernel now kills whatever the program left behind


def _isolated(cfg, status_fd, ctl_fd):
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent stops a run with SIGTERM: we kill pid 1 and wait for it, which returns only once the
    # kernel has torn down every process of the namespace, so the parent sees nothing left alive.
    pid1: list[int] = []

    def stop(*_):
        if not pid1:
            sys.exit(SETUP_FAILED)
        os.kill(pid1[0], signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags), "unshare(user, pid, net, mount, ipc, uts)")
    if cfg["mode"] == "ns-parent":
        os.write(status_fd, b"U\n")
        if os.read(ctl_fd, 1) != b"G":
            raise SetupError("the parent did not write the uid map")
    else:
        _map_self()
    # Opened now: inside the new mount namespace (a bind source must be), and while we still are the
    # caller's uid, which may enter folders (a pyenv under /root, the 0700 work folder) the namespace's
    # uids cannot.
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for paths in cfg["expose"].values() for p in paths}
    with open(os.path.join(cfg["workdir"], "main.py"), "rb") as fh:
        program = fh.read()
    if cfg["mode"] == "ns-parent":
        os.setgroups([])  # the caller's supplementary groups (root's) would still count outside
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)  # root of the namespace: an unprivileged uid outside
    _build_mounts(cfg, program, keep)
    for fd in (*keep.values(), ctl_fd):
        os.close(fd)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # no stop() between fork and append
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            _pid1(cfg, status_fd)
        except BaseException as exc:
            os.write(status_fd, f"E pid 1: {exc}\n".encode())
        os._exit(SETUP_FAILED)
    pid1.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main():
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))  # marshal: no import cost, unlike json
    status_fd, ctl_fd = cfg["status_fd"], cfg["ctl_fd"]
    try:
        if cfg["mode"] == "plain":  # no namespaces: limits, empty environment, own folder only
            os.close(ctl_fd)
            _exec_program(cfg, cfg["workdir"])
        code = _isolated(cfg, status_fd, ctl_fd)
    except Exception as exc:
        os.write(status_fd, f"E {type(exc).__name__}: {exc}\n".encode())
        code = SETUP_FAILED
    sys.exit(code if code >= 0 else SETUP_FAILED)


if __name__ == "__main__":
    main()
