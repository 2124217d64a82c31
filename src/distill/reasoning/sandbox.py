"""Run untrusted, model-written Python programs in a separate process the program cannot get out of.

The program verifier executes code a model wrote; a Python-level guard is no protection against it. Each
run gets its own process tree in fresh Linux namespaces (user, pid, net, mount, ipc, uts), an unused
unprivileged uid, a read-only view of the file system with private /tmp, no network, an empty
environment, a temporary work folder, rlimits and a wall-clock deadline: `sandbox_child.py` sets it up,
this module drives it and says why a run stopped. See docs/sandbox.md for what is and is not isolated.
"""

from __future__ import annotations

import contextlib
import functools
import marshal
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError, InputError

OUTPUT_LIMIT = 64 * 1024  # bytes kept of stdout and of stderr: a program printing forever fills nothing
ISOLATION = "linux namespaces (user, pid, net, mount, ipc, uts)"
_CHILD = Path(__file__).with_name("sandbox_child.py")
_INNER_UID = 1000  # must match sandbox_child.INNER_UID
_WORK = "/tmp/sandbox"  # the work folder as the isolated program sees it
_SETUP_FAILED = 70
_OPT_IN = "to run model-written programs without isolation set `factory.allow_unisolated: true` in the recipe"


@dataclass(frozen=True)
class Limits:
    """Per-run limits. cpu_s is per process (RLIMIT_CPU, whole seconds, rounded up); memory_mb is address
    space per process; file_mb is the largest file it may write; processes bounds processes and threads."""

    cpu_s: float = 2.0
    wall_s: float = 10.0
    memory_mb: int = 512
    file_mb: int = 1
    processes: int = 32

    def __post_init__(self) -> None:
        bounds = {"cpu_s": 0.0, "wall_s": 0.0, "memory_mb": 16, "file_mb": 0, "processes": 1}
        for name, low in bounds.items():
            value = getattr(self, name)
            strict = isinstance(low, float)  # a time limit must be above zero; counts may equal the bound
            if not isinstance(value, int | float) or value < low or (strict and value <= low):
                raise InputError(
                    f"sandbox limits.{name}: must be {'>' if strict else '>='} {low:g}, got {value!r}"
                )


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within every limit
    returncode: int | None  # exit code, -signal, or None when stopped at the wall-clock deadline
    stdout: str
    stderr: str
    reason: str  # "ok", "exit 1", "timeout", "cpu", "memory", "file size", "signal 9", ...


class SandboxUnavailable(DistillError):
    """No isolation on this machine (or setting it up failed) and the caller did not opt out of it."""


_probe_failure = ""


def _mode() -> str:
    # root may map the program to an unused uid; anyone else can only map itself
    return "ns-parent" if os.geteuid() == 0 else "ns-self"


def isolation() -> str | None:
    """A short name of the isolation this machine provides, None if none (probed once, by a real run)."""
    return _probe()


_probed: list[str | None] = []
_probe_lock = threading.Lock()


def _probe() -> str | None:
    with _probe_lock:
        if not _probed:
            _probed.append(_try_isolation())
        return _probed[0]


def _try_isolation() -> str | None:
    global _probe_failure
    found: str | None = None
    if not sys.platform.startswith("linux"):
        _probe_failure = "namespaces need Linux"
    else:
        try:
            result = _execute("print('ok')", Limits(cpu_s=5, wall_s=30), "", _mode())
            if result.ok and result.stdout == "ok\n":
                found = ISOLATION + (", unprivileged uid" if _mode() == "ns-parent" else "")
            else:
                last = (result.stderr.strip().splitlines() or [""])[-1][:200]
                _probe_failure = f"a test run failed: {result.reason} {last}".strip()
        except (SandboxUnavailable, OSError) as exc:
            _probe_failure = str(exc).removesuffix(f"; {_OPT_IN}")
    return found


def run_python(
    code: str, *, limits: Limits = Limits(), stdin: str = "", allow_unisolated: bool = False
) -> SandboxResult:
    """Run `code` as a program in the sandbox; stdout and stderr are kept up to OUTPUT_LIMIT bytes each."""
    if isolation() is not None:
        return _execute(code, limits, stdin, _mode())
    if not allow_unisolated:
        why = _probe_failure or "user namespaces are not available"
        raise SandboxUnavailable(f"no process isolation on this machine ({why}); {_OPT_IN}")
    return _execute(code, limits, stdin, "plain")


_BOOT = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv.pop(1))))"


@functools.cache
def _launcher_code() -> str:
    """sandbox_child.py compiled once here: a script run by path is compiled on every start (~20 ms)."""
    return marshal.dumps(compile(_CHILD.read_text(), str(_CHILD), "exec")).hex()


def _expose_map() -> dict[str, list[str]]:
    """Folders holding the interpreter that the program's uid could not enter (e.g. a pyenv under /root,
    mode 700): {top folder to cover: [folders to bind back]}."""
    wanted = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))}
    wanted = {p for p in wanted if not any(p != q and p.startswith(q + os.sep) for q in wanted)}
    out: dict[str, list[str]] = {}
    for path in sorted(wanted):
        parts = Path(path).parts
        for depth in range(2, len(parts) + 1):
            folder = str(Path(*parts[:depth]))
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                out.setdefault(folder, []).append(path)
                break
    return out


def _program_env(mode: str, workdir: str) -> dict[str, str]:
    home = workdir if mode == "plain" else _WORK
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "LC_ALL": "C.UTF-8"}


def _execute(code: str, limits: Limits, stdin: str, mode: str) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="distill-sandbox-")
    try:
        return _execute_in(workdir, code, limits, stdin, mode)
    finally:
        _remove(workdir)


def _remove(folder: str) -> None:
    def retry(func, path, _exc):  # type: ignore[no-untyped-def]
        with contextlib.suppress(OSError):  # a program may leave a folder it made unreadable
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)

    shutil.rmtree(folder, onerror=retry)


def _execute_in(workdir: str, code: str, limits: Limits, stdin: str, mode: str) -> SandboxResult:
    Path(workdir, "main.py").write_text(code, encoding="utf-8")
    os.chmod(Path(workdir, "main.py"), 0o644)
    uid = random.SystemRandom().randrange(100_000, 2**31 - 4, 2)  # uid+1 runs the program
    status_r, status_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    exe = os.path.realpath(sys.executable)  # not a venv link: the program gets the standard library only
    cfg = {
        "mode": mode,
        "exe": exe,
        "env": _program_env(mode, workdir),
        "limits": {k: getattr(limits, k) for k in ("cpu_s", "memory_mb", "file_mb", "processes")},
        "expose": _expose_map() if mode == "ns-parent" else {},
        "status_fd": status_w,
        "ctl_fd": ctl_r,
        "workdir": workdir,
    }
    deadline = time.monotonic() + limits.wall_s
    try:
        proc = subprocess.Popen(
            [exe, "-I", "-S", "-c", _BOOT, _launcher_code(), marshal.dumps(cfg).hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            cwd="/",
            start_new_session=True,  # its own process group, killed as one
            pass_fds=(status_w, ctl_r),
        )
    finally:
        for fd in (status_w, ctl_r):
            os.close(fd)
    try:
        io = _Io(proc, status_r, ctl_w, stdin.encode(), uid)
        timed_out = not io.run(deadline)
        if timed_out:
            _stop(proc, mode)
        if mode == "plain":
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            io.finish = (wait_status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
        else:
            proc.wait()
    finally:
        _kill(proc)  # only if something above failed: the launcher is still running
        with contextlib.suppress(ChildProcessError):
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(OSError):
            os.close(status_r)
        with contextlib.suppress(OSError):
            os.close(ctl_w)
    if io.setup_error and not timed_out:
        raise SandboxUnavailable(f"sandbox setup failed: {io.setup_error}; {_OPT_IN}")
    return _result(io, limits, timed_out, proc.returncode)


def _stop(proc: subprocess.Popen[bytes], mode: str) -> None:
    """Stop a run at its deadline. Isolated: SIGTERM asks the launcher to kill the namespace's pid 1 and
    wait until the kernel has killed every process inside; then it exits. Plain: kill the process group."""
    if mode != "plain":
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
            return
    _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class _Io:
    """Feeds stdin, drains stdout/stderr (keeping OUTPUT_LIMIT bytes) and reads the status pipe until all
    are closed or the deadline passes; writes the uid map when the launcher asks for it."""

    def __init__(self, proc: subprocess.Popen[bytes], status_r: int, ctl_w: int, stdin: bytes, uid: int):
        self.proc, self.status_r, self.ctl_w, self.stdin, self.uid = proc, status_r, ctl_w, stdin, uid
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.dropped = {"stdout": 0, "stderr": 0}
        self.status = bytearray()
        self.setup_error = ""
        self.finish: tuple[int, float, int] | None = None  # wait status, cpu seconds, max rss KiB

    def run(self, deadline: float) -> bool:
        """True if every stream closed before the deadline."""
        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None and self.proc.stdin is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(self.status_r, selectors.EVENT_READ, "status")
        os.set_blocking(self.proc.stdin.fileno(), False)
        if self.stdin:
            sel.register(self.proc.stdin, selectors.EVENT_WRITE, "stdin")
        else:
            self.proc.stdin.close()
        try:
            while len(sel.get_map()) > (1 if self.stdin else 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for key, _ in sel.select(left):
                    self._ready(sel, key)
            return True
        finally:
            sel.close()

    def _ready(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        if key.data == "stdin":
            try:
                sent = os.write(key.fd, self.stdin[:65536])
                self.stdin = self.stdin[sent:]
            except (BrokenPipeError, OSError):
                self.stdin = b""
            if not self.stdin:
                sel.unregister(key.fileobj)
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            return
        chunk = os.read(key.fd, 65536)
        if not chunk:
            sel.unregister(key.fileobj)
            return
        if key.data == "status":
            self.status += chunk
            self._status_lines()
            return
        kept = self.out[key.data]
        room = max(0, OUTPUT_LIMIT - len(kept))
        kept += chunk[:room]
        self.dropped[key.data] += len(chunk) - min(room, len(chunk))

    def _status_lines(self) -> None:
        while b"\n" in self.status:
            line, _, rest = bytes(self.status).partition(b"\n")
            self.status = bytearray(rest)
            text = line.decode("utf-8", "replace").replace("\r", " ")
            if text == "U":
                self._write_maps()
            elif text.startswith("E "):
                self.setup_error = self.setup_error or text[2:]
            elif text.startswith("S "):
                status, cpu, rss = text[2:].split()
                self.finish = (int(status), float(cpu), int(rss))

    def _write_maps(self) -> None:
        """Inside: 0 (the launcher) -> uid, 1000 (the program) -> uid + 1; both unused outside."""
        pid, uid = self.proc.pid, self.uid
        try:
            for kind in ("uid_map", "gid_map"):
                Path(f"/proc/{pid}/{kind}").write_text(f"0 {uid} 1\n{_INNER_UID} {uid + 1} 1\n")
            os.write(self.ctl_w, b"G")
        except OSError as exc:
            self.setup_error = f"cannot write the uid map: {exc}"
            with contextlib.suppress(OSError):
                os.write(self.ctl_w, b"X")

    def text(self, name: str) -> str:
        text = self.out[name].decode("utf-8", "replace")
        if self.dropped[name]:
            text += f"\n[... {self.dropped[name]} more bytes dropped]"
        return text


def _result(io: _Io, limits: Limits, timed_out: bool, launcher_code: int | None) -> SandboxResult:
    stdout, stderr = io.text("stdout"), io.text("stderr")
    if timed_out:
        return SandboxResult(False, None, stdout, stderr, "timeout")
    if io.finish is None:  # the launcher died without a report (killed from outside)
        return SandboxResult(False, launcher_code, stdout, stderr, _code_reason(launcher_code))
    status, cpu, rss_kib = io.finish
    code = os.waitstatus_to_exitcode(status)
    tail = stderr[-2000:]
    if code == 0:
        reason = "ok"
    elif code > 0:
        if "MemoryError" in tail:
            reason = "memory"
        elif "[Errno 27]" in tail:  # EFBIG: Python ignores SIGXFSZ, so the write raises
            reason = "file size"
        else:
            reason = f"exit {code}"
    elif -code == signal.SIGXCPU or (-code == signal.SIGKILL and cpu >= limits.cpu_s):
        reason = "cpu"
    elif -code == signal.SIGXFSZ:
        reason = "file size"
    elif (
        -code in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT) and rss_kib >= 0.9 * limits.memory_mb * 1024
    ):
        reason = "memory"
    else:
        reason = f"signal {-code}"
    return SandboxResult(code == 0, code, stdout, stderr, reason)


def _code_reason(code: int | None) -> str:
    if code is None:
        return "timeout"
    return f"signal {-code}" if code < 0 else f"exit {code}"
