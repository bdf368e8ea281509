"""Run untrusted Python (a model's HumanEval completion and its tests) in a throwaway, limited subprocess.

Layers, strongest first; ``isolation()`` says which this machine gives, and every score records it:

- **namespaces** (``unshare``): a new network namespace (only a loopback that is down: no network at all)
  and a new PID namespace whose init is killed with the run (``--kill-child``), so nothing the program
  forks outlives it. As root, ``unshare`` needs nothing else; as another user it first enters a user
  namespace (``--map-root-user``), which most kernels allow unprivileged.
- **another user**: run as root, the program drops to ``nobody`` (``setpriv`` after ``unshare``, or
  ``setuid`` where there are no namespaces), so it cannot write to any file it does not own; its throwaway
  folder is the one place it may write.
- **resource limits** (``setrlimit`` in the child before exec): CPU seconds, address space, size of any file
  written, number of processes; plus a wall-clock limit after which the whole process group is killed.
- **an audit hook** (``sys.addaudithook``, installed before the program runs): refuses opening a file for
  writing, removing or renaming outside the folder, sockets, and starting other programs. This is the
  last line where the namespaces are unavailable; Python code can reach around it with ``ctypes``, the
  layers above cannot be reached around from inside.

    run_python(program, timeout=3.0) -> SandboxResult(status "passed" | "failed" | "timeout", detail)
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

# Runs first in the child: the audit hook, then the program from main.py in the folder (the working dir).
_PRELUDE = r"""
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_BLOCKED = {"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "subprocess.Popen",
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile", "pty.spawn", "ctypes.dlopen"}
def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and not isinstance(args[0], int):
        path, mode, flags = args[0], args[1] or "r", args[2] or 0
        writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the folder: {path}")
    elif event in _PATH_EVENTS and args and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the folder")
sys.addaudithook(_hook)
sys.argv = ["main.py"]
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds, then the process group is killed
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 1 << 20  # the largest file the program may write
    processes: int = 16  # more processes (and threads) than the user already has


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout
    detail: str = ""  # the last line of stderr, or why it was killed

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_executable(path: Path) -> bool:
    """Whether another user can run ``path``: the file and every folder above it have the others' x bit."""
    p = path.resolve()
    return all(os.stat(q).st_mode & stat.S_IXOTH for q in [p, *p.parents])


@functools.lru_cache(maxsize=1)
def interpreter() -> str:
    """The Python that runs programs: this one, unless it sits where ``nobody`` cannot reach it (a root-only
    pyenv), then the system's. The programs need only the standard library."""
    own = Path(sys.executable)
    if os.geteuid() != 0 or _world_executable(own):
        return str(own.resolve())
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _world_executable(Path(candidate)):
            return candidate
    return str(own.resolve())


def _wrapper(mode: str) -> list[str]:
    if mode in ("none", "nobody"):
        return []
    base = ["unshare", "--net", "--pid", "--fork", "--kill-child"]
    if mode == "userns":
        return ["unshare", "--user", "--map-root-user", *base[1:]]
    return [*base, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """The strongest mode that works here, found by trying: "root-netns" (namespaces, then ``nobody``),
    "userns" (namespaces inside a user namespace), "nobody" (root without namespaces: ``nobody`` and the
    limits), or "none" (the limits and the audit hook only)."""
    root = os.geteuid() == 0
    modes = (["root-netns"] if root and shutil.which("setpriv") else []) + ["userns"]
    for mode in modes if shutil.which("unshare") else []:
        try:
            done = subprocess.run(
                [*_wrapper(mode), interpreter(), "-I", "-S", "-c", "pass"], capture_output=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return mode
    # as root, never run a program as root: without namespaces it still drops to nobody
    return "nobody" if root and _world_executable(Path(interpreter())) else "none"


def _user_tasks(uid: int) -> int:
    """Processes and threads of ``uid`` now: RLIMIT_NPROC counts threads too."""
    n = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(entry / "task"))
            except OSError:
                pass
    return n


def _limit(limits: Limits, uid: int, drop_to_nobody: bool = False):
    nproc = _user_tasks(uid) + limits.processes

    def apply() -> None:  # in the child, between fork and exec
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid != 0 or os.geteuid() != 0:  # root ignores RLIMIT_NPROC; nobody's count is set here
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if drop_to_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

    return apply


def run_python(program: str, limits: Limits | None = None, mode: str | None = None) -> SandboxResult:
    """Run ``program`` (Python source) sandboxed; "passed" when it exits 0 within the limits."""
    limits = limits or Limits()
    mode = mode or isolation()
    as_nobody = mode in ("root-netns", "nobody")
    uid = NOBODY if as_nobody else os.geteuid()
    with tempfile.TemporaryDirectory(prefix="glmwb-sandbox-") as folder:
        (Path(folder) / "main.py").write_text(program, encoding="utf-8")
        if as_nobody:
            os.chown(folder, NOBODY, NOBODY)
        cmd = [*_wrapper(mode), interpreter(), "-I", "-S", "-c", _PRELUDE]
        proc = subprocess.Popen(
            cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_limit(limits, uid, drop_to_nobody=mode == "nobody"), env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return SandboxResult("timeout", f"killed after {limits.timeout:g} s")
        finally:
            _kill(proc)
    if proc.returncode == 0:
        return SandboxResult("passed")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode < 0:
        return SandboxResult("failed", f"killed by {signal.Signals(-proc.returncode).name}")
    return SandboxResult("failed", lines[-1][:300] if lines else f"exit {proc.returncode}")


def _kill(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGKILL the run's process group (everything it started that stayed in the session) until the group is
    empty or ``grace`` seconds have passed (a fork bomb's copies fork between two signals), and reap."""
    import time

    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        if proc.poll() is not None and time.monotonic() > deadline:
            break
        time.sleep(0.02)
        if proc.poll() is not None and not _group_alive(proc.pid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process other than a zombie is still in the process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
