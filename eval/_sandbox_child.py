"""The process that runs one untrusted code sample (started by eval/sandbox.py; never imported).

It runs as ``python -I -B _sandbox_child.py`` with a private temporary directory as its working directory, in a
new session (the parent kills the whole process group on its wall timeout) and, where the machine allows it, in
a fresh network namespace. Before any sample code runs it:

1. reads the job (JSON) from stdin, then points fd 0 at /dev/null;
2. sets resource limits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE = 0;
3. keeps a private copy of its stdout for the result line and points fd 1 at /dev/null;
4. installs an audit hook that refuses sockets, fork/exec/spawn/system/subprocess, ctypes, signals to other
   processes, raising resource limits, and any file write, delete, rename or mode change outside the working
   directory (reads stay allowed: the standard library must import).

Modes: ``program`` runs the code as ``__main__`` (HumanEval, MBPP: the asserts are in the code); ``io`` runs
LiveCodeBench tests: standard-input programs (each test: the input file on fd 0, fd 1 captured to a file) or
LeetCode-style calls (``Solution().<fn_name>(*args)``, args one JSON value per input line).

The result is one line ``IDLM-SANDBOX <nonce> <json>`` on the saved stdout; the nonce comes with the job, so the
sample cannot print a fake result.
"""

import json
import os
import sys


def _main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    nonce = job.pop("nonce")
    limits = job.get("limits", {})
    workdir = os.path.realpath(os.getcwd())

    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    result_fd = os.dup(1)
    os.dup2(devnull, 1)
    os.set_inheritable(result_fd, False)

    import resource

    def setlim(which, value):
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
    setlim(resource.RLIMIT_CPU, limits.get("cpu_seconds"))
    setlim(resource.RLIMIT_FSIZE, limits.get("fsize_bytes"))
    setlim(resource.RLIMIT_NPROC, limits.get("nproc"))

    import io
    import signal
    import threading
    import time
    import traceback

    def report(obj):
        data = f"IDLM-SANDBOX {nonce} {json.dumps(obj)}\n".encode()
        os.write(result_fd, data)

    def inside(path):
        try:
            if isinstance(path, int):
                return True  # an already-open descriptor
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            full = os.path.realpath(os.path.join(workdir, os.fspath(path)))
        except Exception:
            return False
        return full == workdir or full.startswith(workdir + os.sep) or full == os.devnull

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = {
        "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp", "os.spawn", "os.exec", "os.system",
        "os.startfile", "subprocess.Popen", "pty.spawn", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata",
        "ctypes.dlsym/handle", "resource.setrlimit", "resource.prlimit", "os.setuid", "os.setgid", "os.chroot",
        "sys.remote_exec", "os.killpg", "signal.pthread_kill", "os.pidfd_open",
    }
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "os.setxattr", "os.removexattr", "shutil.rmtree", "os.chflags", "os.lchflags"}
    two_path_events = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copymode",
                       "shutil.copystat", "shutil.copytree", "shutil.move"}
    me = os.getpid()

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event in path_events:
            if args and not inside(args[0]):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} outside the working directory")
        elif event in two_path_events:
            for p in args[:2]:
                if isinstance(p, str | bytes | os.PathLike) and not inside(p):
                    raise PermissionError(f"sandbox: {event} on {p!r} outside the working directory")
        elif event == "os.kill":
            if args and args[0] not in (me, 0):
                raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.addaudithook(hook)

    mode = job.get("mode", "program")
    code = job.get("code", "")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    if mode == "program":
        t0 = time.monotonic()
        try:
            compiled = compile(code, "solution.py", "exec")
            exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
            status, detail = "passed", ""
        except SystemExit as exc:
            ok = exc.code in (None, 0)
            status, detail = ("passed", "") if ok else ("failed", f"SystemExit({exc.code!r})")
        except PermissionError as exc:
            status, detail = ("blocked" if "sandbox:" in str(exc) else "failed"), f"PermissionError: {exc}"
        except MemoryError:
            status, detail = "failed", "MemoryError"
        except BaseException as exc:  # noqa: BLE001 - any failure of the sample
            tb = traceback.format_exception_only(type(exc), exc)
            status, detail = "failed", "".join(tb).strip()[-1000:]
        report({"status": status, "detail": detail, "seconds": round(time.monotonic() - t0, 3)})
        return

    # ---- io: LiveCodeBench tests
    tests = job.get("tests", [])
    fn_name = job.get("fn_name")
    per_test = float(job.get("per_test_timeout", 6.0))
    preamble = job.get("preamble", "")

    class _TestTimeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise _TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)

    def outcome(i, status, detail=""):
        report({"status": status, "detail": detail, "tests_passed": i, "tests_total": len(tests)})

    if fn_name:
        glb = {"__name__": "__solution__", "__builtins__": __builtins__}
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            exec(compile(preamble + "\n" + code, "solution.py", "exec"), glb)  # noqa: S102
            signal.setitimer(signal.ITIMER_REAL, 0)
        except _TestTimeout:
            return outcome(0, "timeout", "defining the solution timed out")
        except BaseException as exc:  # noqa: BLE001
            signal.setitimer(signal.ITIMER_REAL, 0)
            return outcome(0, "failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:])
        target = None
        if "Solution" in glb and isinstance(glb["Solution"], type):
            try:
                target = getattr(glb["Solution"](), fn_name)
            except Exception as exc:  # noqa: BLE001
                return outcome(0, "failed", f"Solution().{fn_name}: {type(exc).__name__}: {exc}")
        elif callable(glb.get(fn_name)):
            target = glb[fn_name]
        if target is None:
            return outcome(0, "failed", f"no Solution.{fn_name} or {fn_name}() defined")
        for i, t in enumerate(tests):
            try:
                args = [json.loads(line) for line in t["input"].split("\n") if line.strip()]
                want = json.loads(t["output"])
            except (ValueError, KeyError) as exc:
                return outcome(i, "error", f"test {i}: unreadable test case ({exc})")
            try:
                signal.setitimer(signal.ITIMER_REAL, per_test)
                got = target(*args)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except _TestTimeout:
                return outcome(i, "timeout", f"test {i} took more than {per_test} s")
            except BaseException as exc:  # noqa: BLE001
                signal.setitimer(signal.ITIMER_REAL, 0)
                return outcome(i, "failed", f"test {i}: {type(exc).__name__}: {exc}"[:500])
            try:
                got_json = json.loads(json.dumps(got))
            except (TypeError, ValueError):
                got_json = got
            if not (got_json == want or got == want):
                return outcome(i, "failed", f"test {i}: wrong answer")
        return outcome(len(tests), "passed")

    from decimal import Decimal, InvalidOperation

    def same_output(got, want):
        g = got.strip().split("\n")
        w = want.strip().split("\n")
        if len(g) != len(w):
            return False
        for a, b in zip(g, w):
            a, b = a.strip(), b.strip()
            if a == b:
                continue
            ta, tb = a.split(), b.split()
            if len(ta) != len(tb):
                return False
            try:
                if any(Decimal(x) != Decimal(y) for x, y in zip(ta, tb)):
                    return False
            except (InvalidOperation, ValueError):
                return False
        return True

    try:
        compiled = compile(preamble + "\n" + code, "solution.py", "exec")
    except BaseException as exc:  # noqa: BLE001
        return outcome(0, "failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:])
    import builtins

    for i, t in enumerate(tests):
        in_path = os.path.join(workdir, f".stdin_{i}")
        out_path = os.path.join(workdir, f".stdout_{i}")
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(t.get("input", ""))
        in_fd = os.open(in_path, os.O_RDONLY)
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(in_fd, 0)
        os.dup2(out_fd, 1)
        os.close(in_fd)
        os.close(out_fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=False)
        builtins.input = input  # in case an earlier test replaced it
        status, detail = "passed", ""
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
            for th in threading.enumerate():  # solutions that run main() in a big-stack thread
                if th is not threading.main_thread() and not th.daemon:
                    th.join()
        except _TestTimeout:
            status, detail = "timeout", f"test {i} took more than {per_test} s"
        except SystemExit as exc:
            if exc.code not in (None, 0):
                status, detail = "failed", f"test {i}: SystemExit({exc.code!r})"
        except BaseException as exc:  # noqa: BLE001
            status, detail = "failed", f"test {i}: {type(exc).__name__}: {exc}"[:500]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                sys.stdout.flush()
            except Exception:  # noqa: BLE001
                pass
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
        if status != "passed":
            return outcome(i, status, detail)
        with open(out_path, encoding="utf-8", errors="replace") as f:
            got = f.read()
        if not same_output(got, t.get("output", "")):
            return outcome(i, "failed", f"test {i}: wrong answer")
    return outcome(len(tests), "passed")


if __name__ == "__main__":
    _main()
