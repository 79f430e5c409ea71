"""Run untrusted code samples (HumanEval, MBPP, LiveCodeBench) one sandbox each, and judge them from outside.

The harness side (this module) starts the launcher (eval/sandbox_os.py: namespaces, a private read-only root, no
network, seccomp), which ``execve``\\s the runner (eval/_sandbox_child.py: resource limits, the audit hook of
eval/sandbox_hook.py, then the sample). The verdict is made here:

- ``run_program`` (HumanEval/MBPP: the asserts are part of the program) passes only when the runner's verdict thread
  writes ``IDLM-SANDBOX-DONE <secret>``: the secret is 256 random bits handed to that thread on a pipe of its own
  before the sample starts, and the thread writes it only after the program's code object returned normally. Exiting
  early (``sys.exit(0)``, ``exit()``, ``unittest.main()``, ``os._exit(0)``), printing, calling the runner's
  functions or patching modules cannot produce that line.
- ``run_io_tests`` (LiveCodeBench) sends only the inputs into the sandbox; the outputs come back and are compared
  here (eval/sandbox_compare.py), so a sample cannot print or return an expected output it was never given.

Time: the limit is CPU time of the sample, counted from its first line (RLIMIT_CPU set at that point), with a
wall-clock backstop that also starts when the program starts; interpreter and namespace start-up have their own
generous allowance (``startup_s``). On any deadline the whole process tree is killed: the launcher's death kills
the PID namespace's init and with it every process in the namespace.

Where the machine allows no namespaces (probed once, logged as a warning), samples run with the audit hook,
seccomp, rlimits and a new session only; docs/eval.md says what is lost.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .sandbox_compare import same_output, same_value

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("sandbox_os.py")
CHILD = Path(__file__).with_name("_sandbox_child.py")
RESULT_TAG = "IDLM-SANDBOX"
DONE_TAG = "IDLM-SANDBOX-DONE"
SETUP_TAG = "IDLM-SANDBOX-SETUP"
MAX_LINE = 80 << 20  # one record (a test's whole standard output, JSON-escaped)

# LiveCodeBench's call-based harness runs solutions after these imports (LeetCode-style code relies on them).
LCB_PREAMBLE = (
    "from typing import *\nfrom collections import *\nfrom heapq import *\nfrom bisect import *\n"
    "from itertools import *\nfrom functools import *\nfrom math import *\nfrom string import *\n"
    "from operator import *\nfrom copy import deepcopy\nimport math, heapq, bisect, itertools, functools, collections, "
    "string, re, random, sys, copy, operator\nsys.setrecursionlimit(100000)\n"
)


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # CPU seconds of the sample, counted from its first line
    memory_mb: int = 2048  # RLIMIT_AS
    cpu_s: float | None = None  # RLIMIT_CPU budget from the program's start; default: timeout_s
    wall_s: float | None = None  # wall clock from the program's start; default: 2 * timeout_s + 2
    startup_s: float = 60.0  # wall clock for interpreter and namespace start-up, before the program starts
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file the sample may write
    workdir_mb: int = 64  # size of the private tmpfs working directory (namespaces only)
    nproc_extra: int = 64  # RLIMIT_NPROC where seccomp is missing (ignored for root)
    network: str = "auto"  # "hook": no namespaces, the audit hook alone refuses sockets (kept for old callers)
    isolation: str = "auto"  # "auto" (namespaces where the machine allows them) | "namespaces" | "none"
    seccomp: bool = True
    site_packages: bool = False  # show the interpreter's site-packages (read-only) besides the standard library
    audit_hook: bool = True  # False only to test the OS layers on their own (tests/test_eval_sandbox_os.py)

    def child_limits(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else self.timeout_s
        return {"memory_bytes": int(self.memory_mb) << 20, "cpu_seconds": max(0.5, float(cpu)),
                "fsize_bytes": int(self.fsize_mb) << 20, "nproc": _nproc_limit(self.nproc_extra)}

    def wall_limit(self) -> float:
        return self.wall_s if self.wall_s is not None else 2 * self.timeout_s + 2


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | blocked | crashed | error
    detail: str = ""
    seconds: float = 0.0
    tests_passed: int | None = None
    tests_total: int | None = None
    stderr_tail: str = ""
    network_isolated: bool = False
    isolation: str = ""  # namespaces | none
    seccomp: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, "", {})}


# ---------------------------------------------------------------------------------------------- environment
def _nproc_limit(extra: int) -> int | None:
    """Tasks (threads count) of this uid now + ``extra``; None for root, whom RLIMIT_NPROC does not bind."""
    uid = os.getuid()
    if uid == 0:
        return None
    n = 0
    try:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = f.read()
            except OSError:
                continue
            real_uid = threads = None
            for line in status.splitlines():
                if line.startswith("Uid:"):
                    real_uid = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
            if real_uid == uid:
                n += threads or 1
    except OSError:
        return None
    return n + extra


def _child_env(workdir: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


_PROBE: dict = {}
_PROBE_LOCK = threading.Lock()


def namespaces_available() -> tuple[bool, str]:
    """Whether samples can run in namespaces here (probed once per process by running an empty program)."""
    with _PROBE_LOCK:
        if "ok" not in _PROBE:
            if os.environ.get("IDLM_SANDBOX_NO_NAMESPACES") == "1" or os.environ.get("IDLM_SANDBOX_NO_NETNS") == "1":
                _PROBE.update(ok=False, why="turned off by IDLM_SANDBOX_NO_NAMESPACES")
            elif not sys.platform.startswith("linux"):
                _PROBE.update(ok=False, why=f"namespaces need Linux (this is {sys.platform})")
            else:
                r = _run({"mode": "program", "code": "pass\n"}, SandboxLimits(timeout_s=5), "namespaces")
                ok = r.passed and r.isolation == "namespaces"
                _PROBE.update(ok=ok, why="" if ok else (r.detail or r.status) + (" " + r.stderr_tail[-300:]
                                                                                 if r.stderr_tail else ""))
            if not _PROBE["ok"]:
                log.warning("sandbox: running code samples WITHOUT namespaces (%s); the files, processes and "
                            "network of this machine are then guarded by the audit hook and seccomp only",
                            _PROBE["why"])
        return _PROBE["ok"], _PROBE["why"]


def _isolation(limits: SandboxLimits) -> str:
    if limits.network == "hook" or limits.isolation == "none":
        return "none"
    if limits.isolation == "namespaces":
        return "namespaces"
    return "namespaces" if namespaces_available()[0] else "none"


# ---------------------------------------------------------------------------------------------- judges
class _ProgramJudge:
    """Passed only on the verdict thread's line carrying the secret."""

    def __init__(self, secret: str):
        self.done_line = f"{DONE_TAG} {secret}".encode()
        self.passed = False
        self.failure: dict | None = None

    def done(self) -> bool:
        return self.passed

    def on_line(self, line: bytes) -> None:
        if line.strip() == self.done_line:
            self.passed = True

    def on_record(self, rec: dict) -> None:
        if rec.get("kind") == "result" and self.failure is None:
            self.failure = rec

    def result(self) -> dict | None:
        if self.passed:
            return {"status": "passed"}
        if self.failure is not None:  # a record only ever describes a failure (the sample can write records too)
            status = self.failure.get("status")
            return {"status": status if status in ("failed", "blocked") else "failed",
                    "detail": str(self.failure.get("detail", ""))[:2000]}
        return None


class _IOJudge:
    """Compares each test's reported output with the expected one, in order; decides at the first failure."""

    def __init__(self, wants: list, fn_name: str | None, per_test: float, total: int, unreadable: str = ""):
        self.wants = wants
        self.fn_name = fn_name
        self.per_test = per_test
        self.total = total  # all test cases, including an unreadable one after the runnable ones
        self.unreadable = unreadable
        self.next = 0
        self.verdict: dict | None = None

    def done(self) -> bool:
        return self.verdict is not None

    def on_line(self, line: bytes) -> None:
        pass

    def _decide(self, status: str, detail: str = "") -> None:
        self.verdict = {"status": status, "detail": detail, "tests_passed": self.next, "tests_total": self.total}

    def on_record(self, rec: dict) -> None:
        if self.verdict is not None:
            return
        kind = rec.get("kind")
        if kind == "setup":
            self._decide("timeout" if rec.get("status") == "timeout" else "failed", str(rec.get("detail", "")))
            return
        if kind != "test" or rec.get("i") != self.next:
            return
        i = self.next
        status = rec.get("status")
        if status == "timeout":
            return self._decide("timeout", f"test {i} took more than {self.per_test:g} s")
        if status != "ok":
            return self._decide("failed", f"test {i}: {rec.get('detail', '')}"[:500])
        if self.fn_name:
            ok = isinstance(rec.get("value"), str) and same_value(rec["value"], self.wants[i])
        else:
            ok = isinstance(rec.get("stdout"), str) and same_output(rec["stdout"], self.wants[i])
        if not ok:
            return self._decide("failed", f"test {i}: wrong answer")
        self.next += 1
        if self.next == len(self.wants):
            if self.unreadable:
                self._decide("error", self.unreadable)
            else:
                self._decide("passed")

    def result(self) -> dict | None:
        return self.verdict


# ---------------------------------------------------------------------------------------------- running
def _run(job: dict, limits: SandboxLimits, mode: str | None = None, judge=None) -> SandboxResult:
    mode = mode or _isolation(limits)
    nonce = secrets.token_hex(16)
    secret = secrets.token_hex(32)
    judge = judge or _ProgramJudge(secret)
    tmp = tempfile.mkdtemp(prefix="idlm-sbx-")
    work, newroot, stderr_path = os.path.join(tmp, "work"), os.path.join(tmp, "root"), os.path.join(tmp, "stderr")
    os.mkdir(work, 0o700)
    os.mkdir(newroot, 0o700)
    cfg = {"isolation": mode, "newroot": newroot, "workdir_mb": limits.workdir_mb,
           "site_packages": limits.site_packages, "seccomp": limits.seccomp, "parent": os.getpid()}
    secret_r, secret_w = os.pipe()
    os.write(secret_w, secret.encode())
    os.close(secret_w)
    payload = json.dumps({**job, "nonce": nonce, "secret_fd": secret_r, "limits": limits.child_limits(),
                          "audit_hook": limits.audit_hook}).encode()
    cmd = [sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(cfg)]
    proc = None
    t0 = time.monotonic()
    t_start = None
    info: dict = {}
    timed_out = False
    setup_error = ""
    try:
        with open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=_child_env(work), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                        close_fds=True, pass_fds=(secret_r,))
            except OSError as exc:
                return SandboxResult(False, "error", f"cannot start the sandbox: {exc}")
            finally:
                os.close(secret_r)
        feeder = threading.Thread(target=_feed, args=(proc, payload), daemon=True)
        feeder.start()
        tag = f"{RESULT_TAG} {nonce} ".encode()
        sel = selectors.DefaultSelector()
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
        buf = b""
        eof = False
        while not judge.done():
            now = time.monotonic()
            deadline = (t_start + limits.wall_limit()) if t_start is not None else t0 + limits.startup_s
            if now >= deadline:
                timed_out = True
                break
            if eof:
                try:
                    proc.wait(timeout=min(0.2, deadline - now))
                    break
                except subprocess.TimeoutExpired:
                    continue
            if not sel.select(timeout=min(1.0, deadline - now)):
                continue
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                eof = True
                continue
            buf += chunk
            while b"\n" in buf and not judge.done():
                line, buf = buf.split(b"\n", 1)
                if line.startswith(DONE_TAG.encode()):
                    judge.on_line(line)
                elif line.startswith(tag):
                    try:
                        rec = json.loads(line[len(tag):])
                    except ValueError:
                        continue
                    if not isinstance(rec, dict):
                        continue
                    if rec.get("kind") == "started" and t_start is None:
                        t_start = time.monotonic()
                        info = rec
                    else:
                        judge.on_record(rec)
                elif line.startswith(SETUP_TAG.encode()) and t_start is None:
                    try:
                        setup_error = str(json.loads(line[len(SETUP_TAG):]).get("error", ""))
                    except ValueError:
                        setup_error = "unreadable set-up report"
            if len(buf) > MAX_LINE:
                setup_error = setup_error or "a record longer than the limit"
                break
        sel.close()
    finally:
        if proc is not None:
            _kill_tree(proc)
        seconds = time.monotonic() - (t_start if t_start is not None else t0)
        stderr_tail = _tail(stderr_path)
        shutil.rmtree(tmp, ignore_errors=True)
    common = {"seconds": round(seconds, 3), "network_isolated": info.get("isolation") == "namespaces",
              "isolation": str(info.get("isolation", mode if t_start is not None else "")),
              "seccomp": bool(info.get("seccomp"))}
    verdict = judge.result()
    if verdict is not None:
        status = verdict["status"]
        return SandboxResult(passed=status == "passed", status=status, detail=str(verdict.get("detail", "")),
                             tests_passed=verdict.get("tests_passed"), tests_total=verdict.get("tests_total"),
                             stderr_tail="" if status == "passed" else stderr_tail, **common)
    extra_counts = {}
    if isinstance(judge, _IOJudge):
        extra_counts = {"tests_passed": judge.next, "tests_total": judge.total}
    if setup_error:
        return SandboxResult(False, "error", f"sandbox set-up failed: {setup_error}", stderr_tail=stderr_tail,
                             **extra_counts, **common)
    if timed_out:
        what = (f"killed after {limits.wall_limit():g} s (wall clock from the program's start)" if t_start is not None
                else f"the program did not start within {limits.startup_s:g} s")
        return SandboxResult(False, "timeout", what, stderr_tail=stderr_tail, **extra_counts, **common)
    rc = proc.returncode if proc is not None else None
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and 128 < rc < 128 + 65 else None)
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        cpu = limits.child_limits()["cpu_seconds"]
        status = "timeout" if sig == signal.SIGXCPU or (sig == signal.SIGKILL and seconds >= cpu) else "crashed"
        return SandboxResult(False, status, f"killed by {name}" + (" (CPU time limit)" if status == "timeout" else ""),
                             stderr_tail=stderr_tail, **extra_counts, **common)
    return SandboxResult(False, "crashed", f"exited with status {rc} without a result", stderr_tail=stderr_tail,
                         **extra_counts, **common)


def _feed(proc: subprocess.Popen, payload: bytes) -> None:
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except (OSError, ValueError):
        pass  # the sandbox died early: the reader reports it


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher's session; in namespaces the launcher's death also kills the PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher leads its own session, so its pgid is its pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for f in (proc.stdout, proc.stdin):
        try:
            if f is not None:
                f.close()
        except OSError:
            pass


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- public API
def run_program(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a script; passed when the whole program ran to its end (HumanEval/MBPP: asserts inside).
    An exit before the end, even with status 0, is a failure."""
    return _run({"mode": "program", "code": code}, limits or SandboxLimits())


def _call_args(text: str) -> list:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def run_io_tests(code: str, tests: list[dict], fn_name: str | None = None, per_test_timeout: float = 6.0,
                 limits: SandboxLimits | None = None, preamble: str | None = None) -> SandboxResult:
    """LiveCodeBench-style tests: ``tests`` = [{"input": str, "output": str}]; standard input/output programs when
    ``fn_name`` is None, else calls of ``Solution().fn_name`` with one JSON argument per input line. Only the
    inputs enter the sandbox; outputs are compared here."""
    if limits is None:
        limits = SandboxLimits(timeout_s=min(300.0, per_test_timeout * (len(tests) + 1) + 5))
    if not code.strip():
        return SandboxResult(False, "failed", "no code")
    if not tests:
        return SandboxResult(False, "error", "no test cases")
    inputs: list[Any] = []
    wants: list[Any] = []
    unreadable = ""
    for i, t in enumerate(tests):
        try:
            if fn_name:
                inputs.append(_call_args(t["input"]))
                wants.append(json.loads(t["output"]))
            else:
                inputs.append(str(t.get("input", "")))
                wants.append(str(t.get("output", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            inputs, wants = inputs[:i], wants[:i]
            unreadable = f"test {i}: unreadable test case ({exc})"
            break
    if not inputs:
        return SandboxResult(False, "error", unreadable, tests_passed=0, tests_total=len(tests))
    judge = _IOJudge(wants, fn_name, per_test_timeout, len(tests), unreadable)
    job = {"mode": "io", "code": code, "inputs": inputs, "fn_name": fn_name, "per_test_timeout": per_test_timeout,
           "preamble": LCB_PREAMBLE if preamble is None else preamble}
    return _run(job, limits, judge=judge)
