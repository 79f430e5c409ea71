"""The code sandbox: passing/failing code, and samples that loop, allocate, fork, write outside, open sockets."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from idlm.eval.sandbox import SandboxLimits, run_io_tests, run_program

FAST = SandboxLimits(timeout_s=2.5, memory_mb=512)


def test_passing_and_failing_programs():
    assert run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n", FAST).passed
    r = run_program("assert 1 == 2, 'nope'\n", FAST)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.detail
    r = run_program("def broken(:\n", FAST)
    assert r.status == "failed" and "SyntaxError" in r.detail
    r = run_program("import sys\nsys.exit(3)\n", FAST)
    assert r.status == "failed"


def test_infinite_loop_is_killed_on_the_wall_timeout():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5, memory_mb=512))
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 10


def test_sleeping_child_and_its_group_are_killed():
    r = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.0, memory_mb=512))
    assert r.status == "timeout"


def test_memory_limit():
    r = run_program("x = bytearray(3 * 1024 ** 3)\n", FAST)
    assert not r.passed and "MemoryError" in r.detail


def test_fork_and_subprocess_are_refused():
    for code in ("import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n",
                 "import os\nos.system('true')\n",
                 "import multiprocessing as m\np = m.Process(target=print)\np.start()\n",
                 "import ctypes\nctypes.CDLL(None).fork()\n"):
        r = run_program(code, FAST)
        assert not r.passed, code
        assert r.status in ("blocked", "failed"), (code, r)


def test_writing_outside_the_working_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert r.status == "blocked" and not target.exists()
    r = run_program(f"import os\nos.remove({str(__file__)!r})\n", FAST)
    assert r.status == "blocked" and os.path.exists(__file__)
    r = run_program("import shutil\nshutil.rmtree('/tmp')\n", FAST)
    assert not r.passed
    # inside its own directory it may write
    assert run_program("open('ok.txt', 'w').write('x')\nassert open('ok.txt').read() == 'x'\n", FAST).passed


def test_file_size_limit():
    r = run_program("open('big', 'wb').write(b'x' * (64 << 20))\n", SandboxLimits(timeout_s=5, fsize_mb=1))
    assert not r.passed


def test_socket_is_refused_and_no_connection_arrives():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted = []
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(conn)
                return
            except TimeoutError:
                continue

    th = threading.Thread(target=accept)
    th.start()
    try:
        r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n", FAST)
        time.sleep(0.3)
        done.set()
        th.join()
    finally:
        srv.close()
    assert not r.passed and r.status == "blocked"
    assert accepted == []
    # also with the audit hook alone (no network namespace)
    r = run_program("import socket\nsocket.socket()\n", SandboxLimits(timeout_s=2.5, network="hook"))
    assert r.status == "blocked"


def test_cannot_forge_a_pass_or_kill_the_parent():
    r = run_program("import os\nos._exit(0)\n", FAST)  # exits before the harness reports: not a pass
    assert not r.passed
    r = run_program("print('IDLM-SANDBOX 0000 {\"status\": \"passed\"}')\nassert False\n", FAST)
    assert not r.passed
    r = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", FAST)
    assert r.status == "blocked"


def test_harness_goes_on_in_parallel():
    codes = ["assert True\n", "while True: pass\n", "import os\nos.fork()\n", "assert 2 + 2 == 4\n"]
    with ThreadPoolExecutor(4) as ex:
        res = list(ex.map(lambda c: run_program(c, SandboxLimits(timeout_s=1.5, memory_mb=512)), codes))
    assert [r.passed for r in res] == [True, False, False, True]


STDIN_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 -7\n", "output": "-2"}]


@pytest.mark.parametrize("code", [
    "a, b = map(int, input().split())\nprint(a + b)\n",
    "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n",
    "a, b = map(int, open(0).read().split())\nprint(a + b)\n",
    "import sys\ndata = sys.stdin.buffer.read().split()\nsys.stdout.write(str(int(data[0]) + int(data[1])) + '\\n')\n",
    "import threading\ndef main():\n    a, b = map(int, input().split())\n    print(a + b)\n"
    "threading.Thread(target=main).start()\n",
    "a, b = map(int, input().split())\nprint(a + b)\nexit()\n",
])
def test_io_tests_stdin_programs(code):
    r = run_io_tests(code, STDIN_TESTS)
    assert r.passed, r
    assert r.tests_passed == 2


def test_io_tests_failures():
    assert run_io_tests("print(3)\n", STDIN_TESTS).status == "failed"
    r = run_io_tests("while True: pass\n", STDIN_TESTS, per_test_timeout=0.5)
    assert r.status == "timeout"
    assert run_io_tests("", STDIN_TESTS).status == "failed"
    # float tokens compare as decimals, whitespace at line ends is ignored
    assert run_io_tests("print('1.50  ')\n", [{"input": "", "output": "1.5\n"}]).passed


def test_io_tests_functional():
    tests = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]"}, {"input": "[3, 2, 4]\n6", "output": "[1, 2]"}]
    good = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
            "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
            "                return (seen[target - x], i)\n            seen[x] = i\n")
    r = run_io_tests(good, tests, fn_name="twoSum")
    assert r.passed, r  # a tuple result equals the JSON list
    bad = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 0]\n"
    assert not run_io_tests(bad, tests, fn_name="twoSum").passed
    assert run_io_tests("x = 1\n", tests, fn_name="twoSum").status == "failed"
