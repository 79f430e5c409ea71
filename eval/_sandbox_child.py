"""The runner: the process that runs one untrusted code sample.

eval/sandbox_os.py (the launcher) contains the process at the OS level, then starts this file by ``execve`` as a
fresh ``python -I -S -B`` whose global ``SANDBOX`` holds the hook's source, the launcher's report and the read-only
view; it is never imported. Before any sample code runs it:

1. reads the job (JSON) from stdin; the verdict secret, when there is one, waits on a separate descriptor;
2. sets resource limits (memory, file size, no core files; processes where seccomp is missing);
3. imports the modules samples commonly use (later imports compile from source: unmarshalling is refused);
4. points fd 0 and fd 1 at /dev/null (LiveCodeBench programs get a file per test) and keeps a private copy of the
   original stdout for its records: lines ``IDLM-SANDBOX <nonce> <json>``;
5. sets RLIMIT_CPU to the CPU used so far + the time limit (the limit counts the sample, not the start-up);
6. installs the audit hook (eval/sandbox_hook.py) and reports ``started`` (the harness starts its wall clock here).

Modes. ``program`` (HumanEval, MBPP: the asserts are in the program): passed means the program's code object
returned normally, and only the verdict thread can say so: it alone reads the secret (before the sample starts) and
writes ``IDLM-SANDBOX-DONE <secret>`` once it sees the judged frame standing on its last line, which that frame
reaches only after ``exec`` of the whole program returned. A ``SystemExit`` (``sys.exit(0)``, ``exit()``,
``unittest.main()``), ``os._exit`` or a crash before then is a failure. ``io`` (LiveCodeBench): the runner only
runs the program on each test's input (or calls ``Solution().<fn_name>(*args)``) and reports what came out; it never
sees the expected outputs, which the harness compares itself.
"""

import json
import os
import sys

RECORD = "IDLM-SANDBOX"
DONE = b"IDLM-SANDBOX-DONE "
PRELOAD = ("typing", "collections", "heapq", "bisect", "itertools", "functools", "math", "cmath", "string",
           "operator", "copy", "re", "random", "json", "decimal", "fractions", "statistics", "datetime",
           "dataclasses", "enum", "array", "struct", "numbers", "hashlib", "textwrap", "io", "threading",
           "traceback", "unittest")


def _verdict(frame, done_line, secret_fd, out_fd, go_acquire, ack_release, ready_release, read, write, close):
    """The verdict thread. It holds the secret; no sample code can reach this frame (audited events are refused
    in this thread, other threads' frames are refused to everyone). It writes the completion line only while the
    judged frame stands on ``done_line``."""
    secret = b""
    while len(secret) < 64:
        chunk = read(secret_fd, 64 - len(secret))
        if not chunk:
            break
        secret += chunk
    close(secret_fd)
    line = DONE + secret + b"\n"
    secret = chunk = None
    ready_release()
    while True:
        go_acquire()  # released by the judged frame on its last line (or by the sample: then it re-checks)
        if frame.f_lineno == done_line:
            write(out_fd, line)
            ack_release()
            return


def _judged(code_obj, ns, secret_fd, out_fd, install_hook, started, _exec=exec):
    """Runs the program; its last line is the only place where the verdict thread writes the completion line."""
    import _thread

    frame = sys._getframe()
    done_line = max(line for _, _, line in frame.f_code.co_lines() if line is not None)
    go, ack, ready = _thread.allocate_lock(), _thread.allocate_lock(), _thread.allocate_lock()
    go.acquire()
    ack.acquire()
    ready.acquire()
    ident = _thread.start_new_thread(_verdict, (frame, done_line, secret_fd, out_fd, go.acquire, ack.release,
                                                ready.release, os.read, os.write, os.close))
    ready.acquire()
    install_hook(ident)
    started()
    _exec(code_obj, ns)
    go.release(); ack.acquire()  # noqa: E702 - must stay the function's last line (done_line)


def _failure(exc: BaseException) -> tuple[str, str]:
    import traceback

    try:
        if isinstance(exc, SystemExit):
            return "failed", f"the program exited (SystemExit({exc.code!r})) before it finished"
        if isinstance(exc, PermissionError) and "sandbox:" in str(exc):
            return "blocked", f"PermissionError: {exc}"
        if isinstance(exc, MemoryError):
            return "failed", "MemoryError"
        return "failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()[-1000:]
    except BaseException:  # noqa: BLE001 - a sample exception whose str() fails
        return "failed", type(exc).__name__


def _set_rlimits(limits: dict) -> None:
    import resource

    def setlim(which: int, value) -> None:
        if value is None:
            return
        soft, hard = resource.getrlimit(which)
        value = int(value)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            resource.setrlimit(which, (value, hard))

    setlim(resource.RLIMIT_CORE, 0)
    setlim(resource.RLIMIT_AS, limits.get("memory_bytes"))
    setlim(resource.RLIMIT_FSIZE, limits.get("fsize_bytes"))
    setlim(resource.RLIMIT_NPROC, limits.get("nproc"))


def _set_cpu_limit(seconds: float) -> None:
    """RLIMIT_CPU = CPU used so far + ``seconds`` (soft: SIGXCPU; hard one second later: SIGKILL)."""
    import math
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(math.ceil(ru.ru_utime + ru.ru_stime + seconds))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    new_hard = soft + 1 if hard == resource.RLIM_INFINITY else min(hard, soft + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, new_hard), new_hard))


def _load_hook_builder(source: str):
    import types

    mod = types.ModuleType("sandbox_hook")
    exec(compile(source, "<sandbox hook>", "exec"), mod.__dict__)  # noqa: S102 - our own module's source
    return mod.build_hook


def _main(sandbox: dict) -> None:
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    nonce = job["nonce"]
    out_fd = os.dup(1)

    def emit(obj: dict) -> None:
        os.write(out_fd, f"{RECORD} {nonce} {json.dumps(obj)}\n".encode())

    info = dict(sandbox.get("info") or {})
    roots = list(sandbox.get("roots") or [])
    sys.path.extend(p for p in sandbox.get("site") or [] if p not in sys.path)
    workdir = os.path.realpath(os.getcwd())
    workdir_dev = os.stat(workdir).st_dev if info.get("isolation") == "namespaces" else -1
    os.environ.update(HOME=workdir, TMPDIR=workdir)
    limits = job.get("limits", {})
    _set_rlimits({**limits, "nproc": None if info.get("seccomp") else limits.get("nproc")})
    build_hook = _load_hook_builder(sandbox["hook"])
    import builtins

    if not hasattr(builtins, "exit"):  # python -S leaves out site's exit()/quit(); programs call them
        import _sitebuiltins

        builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
        builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")

    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a module this interpreter lacks
            pass
    sys.pycache_prefix = workdir + "/.no-bytecode"  # later imports compile from source (no marshal)
    sys.argv = ["solution.py"]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)

    def install(helper_ident=None) -> None:
        _set_cpu_limit(float(limits.get("cpu_seconds", 10)))
        if job.get("audit_hook", True):
            sys.addaudithook(build_hook(workdir, roots, helper_ident, workdir_dev))

    def started() -> None:
        emit({"kind": "started", **info})

    if job.get("mode", "program") == "program":
        _program(job, emit, out_fd, install, started)
    else:
        _io(job, emit, install, started, workdir, devnull)
    os._exit(0)


def _program(job: dict, emit, out_fd: int, install, started) -> None:
    import builtins

    try:
        compiled = compile(job.get("code", ""), "solution.py", "exec")
    except BaseException as exc:  # noqa: BLE001 - a syntax error is the sample's failure
        install()
        started()
        status, detail = _failure(exc)
        emit({"kind": "result", "status": status, "detail": detail})
        return
    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        _judged(compiled, ns, int(job["secret_fd"]), out_fd, install, started)
    except BaseException as exc:  # noqa: BLE001 - any failure of the sample
        status, detail = _failure(exc)
        emit({"kind": "result", "status": status, "detail": detail})


class _TestTimeout(BaseException):
    pass


def _plain(obj):
    """json.dumps fallback for the values LeetCode-style solutions return besides JSON types."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    import numbers

    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _io(job: dict, emit, install, started, workdir: str, devnull: int) -> None:
    """LiveCodeBench tests: run each input, report what came out; the harness compares."""
    import builtins
    import io
    import signal
    import threading
    import traceback

    inputs = job.get("inputs", [])
    fn_name = job.get("fn_name")
    per_test = float(job.get("per_test_timeout", 6.0))
    wall_per_test = 2 * per_test + 1
    preamble = job.get("preamble", "")
    dumps = json.dumps

    def on_timer(signum, frame):
        raise _TestTimeout()

    signal.signal(signal.SIGPROF, on_timer)
    signal.signal(signal.SIGALRM, on_timer)

    def arm(on: bool) -> None:
        signal.setitimer(signal.ITIMER_PROF, per_test if on else 0)  # CPU time of the process
        signal.setitimer(signal.ITIMER_REAL, wall_per_test if on else 0)  # a backstop for sleeping programs

    def detail_of(exc: BaseException, limit: int = 500) -> str:
        try:
            return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-limit:]
        except BaseException:  # noqa: BLE001
            return type(exc).__name__

    install()
    started()
    if fn_name:
        glb = {"__name__": "__solution__", "__builtins__": builtins}
        try:
            arm(True)
            exec(compile(preamble + "\n" + code_of(job), "solution.py", "exec"), glb)  # noqa: S102
            arm(False)
        except _TestTimeout:
            return emit({"kind": "setup", "status": "timeout", "detail": "defining the solution timed out"})
        except BaseException as exc:  # noqa: BLE001
            arm(False)
            return emit({"kind": "setup", "status": "failed", "detail": detail_of(exc)})
        target = None
        try:
            if "Solution" in glb and isinstance(glb["Solution"], type):
                target = getattr(glb["Solution"](), fn_name)
            elif callable(glb.get(fn_name)):
                target = glb[fn_name]
        except BaseException as exc:  # noqa: BLE001
            return emit({"kind": "setup", "status": "failed",
                         "detail": f"Solution().{fn_name}: {type(exc).__name__}: {detail_of(exc, 300)}"})
        if target is None:
            return emit({"kind": "setup", "status": "failed",
                         "detail": f"no Solution.{fn_name} or {fn_name}() defined"})
        for i, args in enumerate(inputs):
            try:
                arm(True)
                got = target(*args)
                arm(False)
            except _TestTimeout:
                return emit({"kind": "test", "i": i, "status": "timeout"})
            except BaseException as exc:  # noqa: BLE001
                arm(False)
                return emit({"kind": "test", "i": i, "status": "failed",
                             "detail": detail_of(exc, 400)})
            try:
                value = dumps(got, default=_plain)
            except BaseException as exc:  # noqa: BLE001 - a value JSON cannot hold is a wrong answer
                return emit({"kind": "test", "i": i, "status": "failed",
                             "detail": f"the result cannot be compared ({type(exc).__name__})"})
            emit({"kind": "test", "i": i, "status": "ok", "value": value})
        return

    try:
        compiled = compile(preamble + "\n" + code_of(job), "solution.py", "exec")
    except BaseException as exc:  # noqa: BLE001
        return emit({"kind": "setup", "status": "failed", "detail": detail_of(exc)})
    real_input = builtins.input
    for i, text in enumerate(inputs):
        in_path = os.path.join(workdir, f".stdin_{i}")
        out_path = os.path.join(workdir, f".stdout_{i}")
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(text)
        in_fd = os.open(in_path, os.O_RDONLY)
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(in_fd, 0)
        os.dup2(out_fd, 1)
        os.close(in_fd)
        os.close(out_fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=False)
        builtins.input = real_input  # in case an earlier test replaced it
        status, detail = "ok", ""
        try:
            arm(True)
            exec(compiled, {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102
            for th in threading.enumerate():  # solutions that run main() in a big-stack thread
                if th is not threading.main_thread() and not th.daemon:
                    th.join()
        except _TestTimeout:
            status = "timeout"
        except SystemExit as exc:
            if exc.code not in (None, 0):
                status, detail = "failed", f"SystemExit({exc.code!r})"
        except BaseException as exc:  # noqa: BLE001
            status, detail = "failed", detail_of(exc, 400)
        finally:
            arm(False)
            try:
                sys.stdout.flush()
            except BaseException:  # noqa: BLE001
                pass
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
        if status != "ok":
            return emit({"kind": "test", "i": i, "status": status, "detail": detail})
        with open(out_path, encoding="utf-8", errors="replace") as f:
            emit({"kind": "test", "i": i, "status": "ok", "stdout": f.read()})


def code_of(job: dict) -> str:
    return job.get("code", "")


if __name__ == "__main__":
    _main(globals()["SANDBOX"])
