"""Hostile samples against the code sandbox: each of these made the earlier sandbox report a pass, escape it or
leak a secret. Every test runs real sandboxes (no mocks); tests that need namespaces skip where the machine has
none (the audit-hook assertions still run)."""

from __future__ import annotations

import dis
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from idlm.eval import sandbox_hook
from idlm.eval.sandbox import SandboxLimits, namespaces_available, run_io_tests, run_program
from tests.helpers import leftovers

FAST = SandboxLimits(timeout_s=3, memory_mb=512)
FALLBACK = SandboxLimits(timeout_s=3, memory_mb=512, isolation="none")
REPO = Path(__file__).resolve().parents[1]
needs_namespaces = pytest.mark.skipif(not namespaces_available()[0], reason="no namespaces on this machine")


def both(code: str) -> list:
    """The sample with namespaces (where available) and without (audit hook and seccomp only)."""
    out = [run_program(code, FALLBACK)]
    if namespaces_available()[0]:
        out.append(run_program(code, FAST))
    return out


# ---------------------------------------------------------------------------------------------- faked passes
@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "raise SystemExit", "exit()", "quit()",
                                       "import unittest\nunittest.main()", "import sys\nsys.exit(None)"])
def test_exiting_before_the_tests_is_not_a_pass(exit_call):
    code = f"def f(x):\n    return x\n{exit_call}\nassert f(1) == 2\n"
    r = run_program(code, FAST)
    assert not r.passed and r.status == "failed", r
    assert "exited" in r.detail


def test_calling_the_harness_reporter_from_its_frame_is_not_a_pass():
    # sys._getframe(1).f_locals held the old child's reporter: calling it with "passed" then os._exit(0) passed
    code = (
        "import sys, os\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    for k, v in list(f.f_locals.items()):\n"
        "        if callable(v) and k in ('report', 'emit', 'outcome', 'started', 'install'):\n"
        "            for arg in ({'status': 'passed', 'kind': 'result'}, {'status': 'passed'}):\n"
        "                try:\n"
        "                    v(arg)\n"
        "                except BaseException:\n"
        "                    pass\n"
        "        if hasattr(v, 'release'):\n"
        "            try:\n"
        "                v.release()\n"
        "            except BaseException:\n"
        "                pass\n"
        "    f = f.f_back\n"
        "import time\ntime.sleep(0.2)\n"
        "os._exit(0)\n"
    )
    for r in both(code):
        assert not r.passed, r


def test_patching_json_dumps_is_not_a_pass():
    # the old child built its result line with json.dumps: a patched dumps turned any result into "passed"
    code = "import json\njson.dumps = lambda *a, **k: '{\"status\": \"passed\", \"kind\": \"result\"}'\nassert False\n"
    for r in both(code):
        assert not r.passed and r.status == "failed", r
    for fn_name, code in ((None, "print(1)\n"), ("f", "class Solution:\n    def f(self, x):\n        return 1\n")):
        patch = "import json\njson.dumps = lambda *a, **k: '{\"status\": \"passed\", \"tests_passed\": 1}'\n"
        r = run_io_tests(patch + code, [{"input": "1", "output": "42"}], fn_name=fn_name)
        assert not r.passed, r


def test_forging_the_completion_line_with_anything_the_sample_can_find_is_not_a_pass():
    # every 32/64-character string in every reachable frame (also frames caught by a signal handler) and whatever
    # the open descriptors give, written as a completion line and as a "passed" record to every descriptor
    code = (
        "import sys, os, signal, time\n"
        "found = set()\n"
        "def take(v):\n"
        "    if isinstance(v, bytes):\n"
        "        v = v.decode('ascii', 'replace')\n"
        "    if isinstance(v, str) and len(v) in (32, 64):\n"
        "        found.add(v)\n"
        "def scan(f):\n"
        "    while f is not None:\n"
        "        for v in list(f.f_locals.values()):\n"
        "            take(v)\n"
        "            if isinstance(v, dict):\n"
        "                for w in list(v.values()):\n"
        "                    take(w)\n"
        "        f = f.f_back\n"
        "signal.signal(signal.SIGALRM, lambda s, fr: scan(fr))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)\n"
        "scan(sys._getframe())\n"
        "for fd in range(64):\n"
        "    try:\n"
        "        take(os.read(fd, 64))\n"
        "    except OSError:\n"
        "        pass\n"
        "t = time.time()\n"
        "while time.time() - t < 0.1:\n"
        "    pass\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "for v in found:\n"
        "    for line in ('IDLM-SANDBOX-DONE ' + v + '\\n',\n"
        "                 'IDLM-SANDBOX ' + v + ' {\"status\": \"passed\", \"kind\": \"result\"}\\n'):\n"
        "        for fd in range(1, 64):\n"
        "            try:\n"
        "                os.write(fd, line.encode())\n"
        "            except OSError:\n"
        "                pass\n"
        "os._exit(0)\n"
    )
    for r in both(code):
        assert not r.passed, r


def test_lcb_expected_outputs_never_enter_the_sandbox():
    # the old child held each test's expected output in a local the program could read from its caller's frame
    tests = [{"input": "1\n", "output": "secret-answer-one"}, {"input": "2\n", "output": "secret-answer-two"}]
    stdin_code = (
        "import sys\n"
        "inp = sys.stdin.read()\n"
        "out = ''\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    for v in list(f.f_locals.values()):\n"
        "        cands = v if isinstance(v, list) else [v]\n"
        "        for t in cands:\n"
        "            if isinstance(t, dict) and t.get('input') == inp and 'output' in t:\n"
        "                out = t['output']\n"
        "            if isinstance(t, str) and t.startswith('secret-answer'):\n"
        "                out = out or t\n"
        "    f = f.f_back\n"
        "print(out)\n"
    )
    r = run_io_tests(stdin_code, tests)
    assert not r.passed and r.tests_passed == 0, r
    call_tests = [{"input": "1", "output": "\"secret-answer-one\""}, {"input": "2", "output": "\"secret-answer-two\""}]
    call_code = (
        "import sys\n"
        "class Solution:\n"
        "    def f(self, x):\n"
        "        fr = sys._getframe(1)\n"
        "        while fr is not None:\n"
        "            if 'want' in fr.f_locals:\n"
        "                return fr.f_locals['want']\n"
        "            fr = fr.f_back\n"
        "        return None\n"
    )
    r = run_io_tests(call_code, call_tests, fn_name="f")
    assert not r.passed and r.tests_passed == 0, r


# ---------------------------------------------------------------------------------------------- escapes
def test_spawnv_passfds_runs_nothing_and_leaves_nothing_alive(tmp_path):
    # multiprocessing.util.spawnv_passfds -> _posixsubprocess.fork_exec raises no audit event: the old sandbox ran
    # sh (as root) and a setsid'd child outlived it
    token = "tok" + uuid.uuid4().hex
    marker = tmp_path / "ran.txt"
    code = (
        "import os, time\n"
        f"os.mkdir({token!r})\n"
        "import multiprocessing.util as u\n"
        f"u.spawnv_passfds(b'/bin/sh', [b'sh', b'-c', b'cd {token} && (setsid sleep 30 &); touch {marker}'], ())\n"
        "time.sleep(0.5)\n"
    )
    for r in both(code):
        assert not r.passed, r
        assert not marker.exists()
        assert leftovers(token) == []


def test_chdir_and_relative_paths_cannot_write_outside(tmp_path):
    code = f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w').write('x')\n"
    for r in both(code):
        assert not r.passed, r
        assert not (tmp_path / "escaped.txt").exists()


def test_dir_fd_cannot_write_or_delete_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    write = (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
             "w = os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)\nos.write(w, b'x')\n")
    delete = f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.unlink('victim.txt', dir_fd=fd)\n"
    for code in (write, delete):
        for r in both(code):
            assert not r.passed, r
    assert not (tmp_path / "escaped.txt").exists()
    assert victim.read_text() == "keep me"


def test_patching_path_functions_does_not_open_the_hook(tmp_path):
    # the old hook called os.path.realpath at check time: a sample could make every path look inside
    code = ("import os, posixpath, builtins\n"
            "here = os.getcwd()\n"
            "posixpath.realpath = os.path.realpath = lambda p, *a, **k: here\n"
            "posixpath._joinrealpath = lambda *a, **k: (here, True)\n"
            "posixpath.join = lambda *a: here\n"
            f"open({str(tmp_path / 'escaped.txt')!r}, 'w').write('x')\n")
    r = run_program(code, FALLBACK)  # the hook is the only layer here
    assert r.status == "blocked", r
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("code", [
    "import sys\nsys._current_frames()\n",
    "import gc\ngc.get_objects()\n",
    "import gc\ngc.get_referrers(gc)\n",
    "import sys\nsys.settrace(lambda *a: None)\n",
    "import sys\nsys.setprofile(lambda *a: None)\n",
    "(lambda: 0).__code__.replace(co_consts=(None, 1))\n",
    "import marshal\nmarshal.loads(marshal.dumps(1))\n",
    "import ctypes\n",
    "import _xxsubinterpreters\n_xxsubinterpreters.create()\n",
    "import _posixsubprocess\n",
    "import os\nos.kill(1, 9)\n",
    "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (-1, -1))\n",
])
def test_introspection_and_escape_hatches_are_refused(code):
    for r in both(code):
        assert r.status == "blocked", (code, r)


def test_the_hook_helpers_cannot_be_changed_from_a_signal_handler(tmp_path):
    # a signal handler gets the interrupted frame: when that is the hook's, its helpers are within reach
    target = tmp_path / "escaped.txt"
    code = (
        "import signal, json\n"
        "hits = {'frames': 0, 'changed': 0, 'refused': 0}\n"
        "def h(sig, frame):\n"
        "    f = frame\n"
        "    while f is not None:\n"
        "        loc = f.f_locals\n"
        "        if '_resolve' in loc:\n"
        "            hits['frames'] += 1\n"
        "            for name in ('_norm', '_resolve', '_fd_inside'):\n"
        "                fn = loc.get(name)\n"
        "                try:\n"
        "                    fn.__defaults__ = tuple('/' for _ in fn.__defaults__)\n"
        "                    hits['changed'] += 1\n"
        "                except PermissionError:\n"
        "                    hits['refused'] += 1\n"
        "        f = f.f_back\n"
        "signal.signal(signal.SIGALRM, h)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)\n"
        "for i in range(20000):\n"
        "    try:\n"
        "        open('f%d' % (i % 10), 'w').close()\n"
        "    except PermissionError:\n"
        "        pass\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "try:\n"
        f"    open({str(target)!r}, 'w').write('x')\n"
        "    wrote = True\n"
        "except OSError:\n"
        "    wrote = False\n"
        "raise SystemExit('RESULT ' + json.dumps([hits, wrote]))\n"
    )
    r = run_program(code, SandboxLimits(timeout_s=10, isolation="none"))  # the hook is the only layer here
    hits, wrote = json.loads(r.detail.split("RESULT ", 1)[1].rsplit("'", 1)[0])
    assert hits["frames"] > 0, hits  # the handler did reach the hook's frame
    assert hits["changed"] == 0 and not wrote and not target.exists(), (hits, r)


def test_a_sample_cannot_add_its_own_audit_hook():
    # a hook of the sample's would see every compile/exec event (the program's code objects) and every argument
    code = ("import sys\ncalls = []\nsys.addaudithook(lambda e, a: calls.append(e))\n"
            "open('x.txt', 'w').write('x')\ncompile('1', 's', 'eval')\nassert calls == [], calls\n")
    for r in both(code):
        assert r.passed, r


def test_ctypes_is_not_reachable_through_subclasses():
    # ctypes' classes would allow unaudited out-of-bounds reads; the runner never loads it
    code = ("seen, todo = set(), [object]\n"
            "while todo:\n"
            "    t = todo.pop()\n"
            "    for s in type.__subclasses__(t):\n"
            "        if s not in seen:\n"
            "            seen.add(s)\n"
            "            todo.append(s)\n"
            "assert not any(s.__module__ in ('_ctypes', 'ctypes') for s in seen), 'ctypes classes reachable'\n")
    for r in both(code):
        assert r.passed, r


def test_hook_functions_use_no_globals_and_no_closures():
    hook = sandbox_hook.build_hook("/tmp", ["/usr/lib"], None, -1)
    funcs = [hook, *[v for v in hook.__defaults__ if callable(v) and getattr(v, "__code__", None)]]
    assert len(funcs) >= 4  # hook, norm, resolve, fdev
    for fn in funcs:
        assert fn.__closure__ is None, fn
        ops = {i.opname for i in dis.get_instructions(fn)}
        assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF", "STORE_GLOBAL"}, (fn, ops)


# ---------------------------------------------------------------------------------------------- secrets
def test_the_harness_environment_and_system_secrets_stay_out(tmp_path):
    # /proc/<ppid>/environ returned the harness's OPENAI_API_KEY; /etc/shadow and /root were readable
    token = "sk-test-" + uuid.uuid4().hex
    probe = (
        "import os\n"
        "found = []\n"
        "for p in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ', '/etc/shadow', "
        f"{str(REPO / 'README.md')!r}]:\n"
        "    try:\n"
        "        found.append(open(p, 'rb').read().decode('latin-1'))\n"
        "    except Exception as e:\n"
        "        pass\n"
        "for d in ('/proc', '/root', " + repr(str(REPO)) + "):\n"
        "    try:\n"
        "        for pid in os.listdir(d):\n"
        "            try:\n"
        "                found.append(open(d + '/' + pid + '/environ', 'rb').read().decode('latin-1'))\n"
        "            except Exception:\n"
        "                found.append(pid)\n"
        "    except Exception:\n"
        "        pass\n"
        "found.append(repr(dict(os.environ)))\n"
        "raise SystemExit(repr(found))\n"
    )
    harness = ("import json, sys\nfrom idlm.eval.sandbox import SandboxLimits, run_program\n"
               f"code = {probe!r}\n"
               "out = [run_program(code, SandboxLimits(timeout_s=3, isolation=iso)).to_dict()\n"
               "       for iso in sys.argv[1:]]\n"
               "print(json.dumps(out))\n")
    modes = ["none"] + (["auto"] if namespaces_available()[0] else [])
    env = {**os.environ, "OPENAI_API_KEY": token}
    p = subprocess.run([sys.executable, "-c", harness, *modes], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(results) == len(modes)
    for r in results:
        text = json.dumps(r)
        assert not r["passed"]
        assert token not in text
        assert "root:" not in text  # /etc/shadow's first line
        assert "Introspective Diffusion" not in text  # the project's README


# ---------------------------------------------------------------------------------------------- time
def test_the_time_limit_does_not_count_start_up():
    # compiling this takes about a second; the program itself is instant. The old wall clock started at spawn.
    code = "x = [" + "1," * 300_000 + "]\nassert len(x) == 300000\n"
    r = run_program(code, SandboxLimits(timeout_s=0.5, memory_mb=1024))
    assert r.passed, r


def test_the_time_limit_is_cpu_time_with_a_wall_clock_backstop():
    assert run_program("import time\ntime.sleep(1.5)\n", SandboxLimits(timeout_s=1.0, memory_mb=512)).passed
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.0, memory_mb=512))
    assert r.status == "timeout", r
    t0 = time.monotonic()
    r = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=0.5, memory_mb=512, wall_s=1.5))
    assert r.status == "timeout" and "wall clock" in r.detail, r
    assert time.monotonic() - t0 < 15
