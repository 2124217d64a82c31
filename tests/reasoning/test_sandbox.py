"""The sandbox against hostile programs: each test runs a real program and checks from outside that it was
stopped, saw nothing it should not, and left nothing behind. Tests that need namespaces skip (saying why)
on a machine without user namespaces; where `unshare -rn` works they must run."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distill.errors import InputError
from distill.reasoning import sandbox
from distill.reasoning.sandbox import Limits, SandboxUnavailable, isolation, run_python

FAST = Limits(cpu_s=1, wall_s=3, memory_mb=256, file_mb=1, processes=16)
REPO = Path(__file__).resolve().parents[2]


def _unshare_works() -> bool:
    """An independent check (util-linux) that this machine offers user + network namespaces."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def isolated() -> str:
    found = isolation()
    if found is None:
        pytest.skip(f"no namespaces on this machine: {sandbox._probe_failure}")
    return found


def _marked(code: str) -> tuple[str, str]:
    """`code` preceded by renaming the process (inherited by its forks), so the test can find survivors."""
    mark = "sbx" + secrets.token_hex(4)
    head = f"import ctypes\nctypes.CDLL(None).prctl(15, {mark.encode()!r}, 0, 0, 0)\n"
    return head + code, mark


def _alive(mark: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == mark:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_isolation_found_where_namespaces_work() -> None:
    if not _unshare_works():
        pytest.skip("`unshare -rn true` fails here: no user namespaces")
    assert isolation() is not None, sandbox._probe_failure


def test_correct_program_passes_with_its_output() -> None:
    result = run_python(
        "import sys\nprint(sum(range(10)), sys.stdin.read().upper())", stdin="abc", limits=FAST
    )
    assert result.ok and result.reason == "ok" and result.returncode == 0
    assert result.stdout == "45 ABC\n"
    assert result.stderr == ""


def test_standard_library_imports() -> None:
    code = "import json, collections, itertools, math, re\nprint(json.dumps(sorted({3, 1, 2})))"
    assert run_python(code, limits=FAST).stdout == "[1, 2, 3]\n"


def test_exit_code_signal_and_error_reasons() -> None:
    assert run_python("raise SystemExit(3)", limits=FAST).reason == "exit 3"
    killed = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", limits=FAST)
    assert (killed.reason, killed.returncode, killed.ok) == ("signal 15", -15, False)
    failed = run_python("assert 1 == 2", limits=FAST)
    assert failed.reason == "exit 1" and "AssertionError" in failed.stderr


def test_endless_loop_is_stopped_quickly() -> None:
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits=FAST)
    assert not result.ok and result.reason in ("timeout", "cpu")
    assert time.monotonic() - start < FAST.wall_s + 2


def test_cpu_limit_names_cpu() -> None:
    result = run_python("while True:\n    pass", limits=Limits(cpu_s=1, wall_s=15))
    assert result.reason == "cpu" and not result.ok


def test_sleeping_program_times_out() -> None:
    start = time.monotonic()
    result = run_python("import time\nprint('up', flush=True)\ntime.sleep(60)", limits=Limits(wall_s=1.5))
    assert (result.reason, result.returncode, result.stdout) == ("timeout", None, "up\n")
    assert time.monotonic() - start < 4


@pytest.mark.parametrize(
    "code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**7))"]
)
def test_unbounded_allocation_is_stopped_as_memory(code: str) -> None:
    result = run_python(code, limits=FAST)
    assert (result.ok, result.reason) == (False, "memory")


@pytest.mark.parametrize(
    "code",
    [
        "open('big', 'wb').write(b'x' * (8 << 20))",
        "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 4096)",
    ],
)
def test_huge_file_is_stopped_as_file_size(code: str) -> None:
    result = run_python(code, limits=FAST)
    assert (result.ok, result.reason) == (False, "file size")


def test_output_is_truncated() -> None:
    result = run_python("import sys\nfor _ in range(300):\n    sys.stdout.write('y' * 4096)", limits=FAST)
    assert result.ok
    assert result.stdout.startswith("y" * 1000)
    assert len(result.stdout) < sandbox.OUTPUT_LIMIT + 100 and "more bytes dropped" in result.stdout


def test_temp_folder_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kwargs: str) -> str:
        made.append(real_mkdtemp(**kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    code = "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a', 0)\nprint(len(os.listdir('.')))"
    assert run_python(code, limits=FAST).stdout == "2\n"  # main.py and a
    run_python("import time\ntime.sleep(30)", limits=Limits(wall_s=1))
    assert len(made) == 2 and not any(os.path.exists(p) for p in made)


def test_parent_secret_is_not_visible(monkeypatch: pytest.MonkeyPatch, isolated: str) -> None:
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("DISTILL_SECRET", secret)
    # /proc/<pid>/environ shows a process's environment as it started: a sibling started with the secret
    neighbour = subprocess.Popen(["sleep", "30"], env={**os.environ, "DISTILL_SECRET": secret})
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError:\n        pass\n"
    )
    try:
        result = run_python(code, limits=FAST)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert result.ok and "PATH" in result.stdout
    assert secret not in result.stdout and "DISTILL_SECRET" not in result.stdout


def test_writes_outside_the_folder_leave_nothing(isolated: str) -> None:
    name = "sandbox-escape-" + secrets.token_hex(6)
    targets = [f"/tmp/{name}", f"../{name}", str(REPO / name), str(Path(tempfile.gettempdir()) / name)]
    code = (
        f"for path in {targets!r}:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as exc:\n        print('refused', path, exc.errno)\n"
    )
    result = run_python(code, limits=FAST)
    assert result.ok
    # read-only (EROFS); or, for a checkout under /tmp, hidden by the sandbox's private /tmp (ENOENT)
    assert any(f"refused {REPO / name} {e}" in result.stdout for e in (errno.EROFS, errno.ENOENT)), (
        result.stdout
    )
    for leftover in (Path("/tmp") / name, REPO / name, Path(tempfile.gettempdir()) / name):
        assert not leftover.exists(), leftover


def test_no_network(isolated: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            f"for address in [('127.0.0.1', {port}), ('192.0.2.1', 80), ('1.1.1.1', 53)]:\n"
            "    try:\n        socket.create_connection(address, timeout=2)\n        print('connected')\n"
            "    except OSError as exc:\n        print('failed', exc.errno)\n"
        )
        result = run_python(code, limits=FAST)
        assert result.ok and "connected" not in result.stdout
        assert result.stdout.count(f"failed {errno.ENETUNREACH}") == 3  # no route at all: no interface is up
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize("spawn", ["fork", "subprocess"])
def test_process_count_is_bounded_and_nothing_survives(isolated: str, spawn: str) -> None:
    start_one = (
        "if os.fork() == 0:\n            os.setsid()\n            time.sleep(60)\n            os._exit(0)"
        if spawn == "fork"
        else "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)"
    )
    code, mark = _marked(
        "import os, subprocess, sys, time\nmade = 0\nfor _ in range(100):\n    try:\n"
        f"        {start_one}\n        made += 1\n    except OSError:\n        break\n"
        "print(made, flush=True)\ntime.sleep(60)\n"
    )
    result = run_python(code, limits=Limits(cpu_s=2, wall_s=4, processes=8))
    assert result.reason == "timeout", result.stderr
    assert 0 < int(result.stdout) < 8  # the limit counts the program itself
    assert _alive(mark) == []


def test_fork_bomb_is_stopped_and_leaves_no_process(isolated: str) -> None:
    code, mark = _marked(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    start = time.monotonic()
    result = run_python(code, limits=Limits(cpu_s=1, wall_s=3, processes=16))
    assert not result.ok and result.reason in ("timeout", "cpu")
    assert time.monotonic() - start < 6
    assert _alive(mark) == []


def test_without_isolation_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation", lambda: None)
    with pytest.raises(SandboxUnavailable) as caught:
        run_python("print(1)")
    message = str(caught.value)
    assert "\n" not in message and "factory.allow_unisolated: true" in message


def test_without_isolation_opt_in_still_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation", lambda: None)
    monkeypatch.setenv("DISTILL_SECRET", "hidden-value")
    result = run_python("import os\nprint(dict(os.environ), os.getcwd())", allow_unisolated=True, limits=FAST)
    assert result.ok and "hidden-value" not in result.stdout and "distill-sandbox-" in result.stdout
    assert run_python("x = bytearray(10**10)", allow_unisolated=True, limits=FAST).reason == "memory"
    stopped = run_python("import time\ntime.sleep(60)", allow_unisolated=True, limits=Limits(wall_s=1))
    assert stopped.reason == "timeout"


@pytest.mark.parametrize("field", ["cpu_s", "wall_s", "memory_mb", "processes"])
def test_bad_limits_name_the_field(field: str) -> None:
    with pytest.raises(InputError, match=field):
        Limits(**{field: 0})


def test_many_files_cannot_fill_the_disk(isolated: str) -> None:
    code = (
        "import errno\nfor i in range(200):\n    try:\n        open(f'f{i}', 'wb').write(b'x' * (512 << 10))\n"
        "    except OSError as exc:\n        print(i, errno.errorcode[exc.errno])\n        break\n"
    )
    result = run_python(code, limits=FAST)  # the work folder is a tmpfs of max(16, 8 * file_mb) MiB
    assert result.ok and result.stdout.split()[1] == "ENOSPC"
    assert 16 <= int(result.stdout.split()[0]) < 200
