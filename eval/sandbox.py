"""Run untrusted code samples (HumanEval, MBPP, LiveCodeBench) one subprocess each, with limits.

Each sample gets: a private temporary directory as its working directory (removed afterwards), a new session
(process group) that is killed as a whole on the wall timeout, resource limits (RLIMIT_AS memory, RLIMIT_CPU,
RLIMIT_FSIZE, RLIMIT_NPROC, no core files), no network (a fresh network namespace through ``unshare`` where the
machine allows it, and in any case an audit hook that refuses socket creation), no fork/exec/subprocess, no
writes outside its directory, and a minimal environment. See eval/_sandbox_child.py for the child's side.

A sample that loops, allocates too much, forks, writes outside its directory or opens a socket fails (or is
killed); the harness goes on. This is containment for buggy or careless model code, not a security boundary
against a determined attacker (ctypes-free CPython escapes exist); run evaluations on a machine you can lose.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("_sandbox_child.py")
RESULT_TAG = "IDLM-SANDBOX"

# LiveCodeBench's call-based harness runs solutions after these imports (LeetCode-style code relies on them).
LCB_PREAMBLE = (
    "from typing import *\nfrom collections import *\nfrom heapq import *\nfrom bisect import *\n"
    "from itertools import *\nfrom functools import *\nfrom math import *\nfrom string import *\n"
    "from operator import *\nfrom copy import deepcopy\nimport math, heapq, bisect, itertools, functools, collections, "
    "string, re, random, sys, copy, operator\nsys.setrecursionlimit(100000)\n"
)


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock for the whole sample
    memory_mb: int = 2048  # RLIMIT_AS
    cpu_s: float | None = None  # RLIMIT_CPU; default: timeout + 1
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file the sample may write
    nproc_extra: int = 64  # RLIMIT_NPROC = tasks this user already has + this (ignored for root)
    network: str = "auto"  # "auto": unshare a network namespace when possible; "hook": the audit hook only

    def child_limits(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 1
        return {"memory_bytes": int(self.memory_mb) << 20, "cpu_seconds": max(1, int(cpu)),
                "fsize_bytes": int(self.fsize_mb) << 20, "nproc": _nproc_limit(self.nproc_extra)}


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
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, "", {})}


# ---------------------------------------------------------------------------------------------- environment probes
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


_NETNS: dict = {}
_NETNS_LOCK = threading.Lock()


def netns_prefix() -> list[str]:
    """The command prefix that runs the child in a new network namespace, or [] when unavailable (probed once)."""
    with _NETNS_LOCK:
        if "prefix" in _NETNS:
            return _NETNS["prefix"]
        prefix: list[str] = []
        exe = shutil.which("unshare")
        if exe and os.environ.get("IDLM_SANDBOX_NO_NETNS") != "1":
            for cand in ([exe, "--net"], [exe, "--map-root-user", "--net"]):
                try:
                    r = subprocess.run([*cand, sys.executable, "-c", "import socket;print(len(socket.if_nameindex()))"],
                                       capture_output=True, text=True, timeout=20)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if r.returncode == 0 and r.stdout.strip() in ("0", "1"):  # only the loopback interface (or none)
                    prefix = cand
                    break
        _NETNS["prefix"] = prefix
        if not prefix:
            log.info("sandbox: no network namespace available; relying on the audit hook to refuse sockets")
        return prefix


def _child_env(workdir: str) -> dict:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return env


# ---------------------------------------------------------------------------------------------- running
def _run(job: dict, limits: SandboxLimits, python: str | None = None) -> SandboxResult:
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="idlm-sbx-")
    os.chmod(workdir, 0o700)
    prefix = netns_prefix() if limits.network == "auto" else []
    cmd = [*prefix, python or sys.executable, "-I", "-B", str(CHILD)]
    payload = json.dumps({**job, "nonce": nonce, "limits": limits.child_limits()}).encode()
    stderr_path = os.path.join(workdir, ".stderr")
    t0 = time.monotonic()
    proc = None
    timed_out = False
    try:
        with open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                        close_fds=True)
            except OSError as exc:
                return SandboxResult(False, "error", f"cannot start the sandbox: {exc}")
            try:
                out, _ = proc.communicate(payload, timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                try:
                    out, _ = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    out = b""
        seconds = time.monotonic() - t0
        stderr_tail = _tail(stderr_path)
        result = _parse(out or b"", nonce)
        if result is not None:
            r = SandboxResult(passed=result.get("status") == "passed", status=result.get("status", "error"),
                              detail=str(result.get("detail", "")), seconds=round(seconds, 3),
                              tests_passed=result.get("tests_passed"), tests_total=result.get("tests_total"),
                              stderr_tail=stderr_tail if result.get("status") != "passed" else "",
                              network_isolated=bool(prefix))
            return r
        if timed_out:
            return SandboxResult(False, "timeout", f"killed after {limits.timeout_s:g} s (wall clock)",
                                 round(seconds, 3), stderr_tail=stderr_tail, network_isolated=bool(prefix))
        rc = proc.returncode if proc is not None else None
        if rc is not None and rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            status = "timeout" if sig == signal.SIGXCPU else "crashed"
            return SandboxResult(False, status, f"killed by {name}", round(seconds, 3), stderr_tail=stderr_tail,
                                 network_isolated=bool(prefix))
        return SandboxResult(False, "crashed", f"exited with status {rc} without a result", round(seconds, 3),
                             stderr_tail=stderr_tail, network_isolated=bool(prefix))
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session, so its pgid is its pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _parse(out: bytes, nonce: str) -> dict | None:
    tag = f"{RESULT_TAG} {nonce} ".encode()
    for line in reversed(out.splitlines()):
        if line.startswith(tag):
            try:
                return json.loads(line[len(tag):])
            except json.JSONDecodeError:
                return None
    return None


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a script; passed when it finishes without an exception (HumanEval/MBPP: asserts inside)."""
    return _run({"mode": "program", "code": code}, limits or SandboxLimits())


def run_io_tests(code: str, tests: list[dict], fn_name: str | None = None, per_test_timeout: float = 6.0,
                 limits: SandboxLimits | None = None, preamble: str | None = None) -> SandboxResult:
    """LiveCodeBench-style tests: ``tests`` = [{"input": str, "output": str}]; standard input/output programs when
    ``fn_name`` is None, else calls of ``Solution().fn_name`` with one JSON argument per input line."""
    if limits is None:
        limits = SandboxLimits(timeout_s=min(300.0, per_test_timeout * (len(tests) + 1) + 5))
    if not code.strip():
        return SandboxResult(False, "failed", "no code")
    if not tests:
        return SandboxResult(False, "error", "no test cases")
    job = {"mode": "io", "code": code, "tests": tests, "fn_name": fn_name, "per_test_timeout": per_test_timeout,
           "preamble": LCB_PREAMBLE if preamble is None else preamble}
    return _run(job, limits)
