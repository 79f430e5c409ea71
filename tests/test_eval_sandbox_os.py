"""The sandbox's OS layers on their own: the audit hook is switched off (``audit_hook=False``) and each sample
asserts from the inside what the kernel refused, so a pass means the layer held. Namespace tests skip where the
machine has no namespaces; the seccomp tests run in both modes."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from idlm.eval import sandbox
from idlm.eval.sandbox import SandboxLimits, namespaces_available, run_program
from idlm.eval.sandbox_os import seccomp_program
from tests.helpers import leftovers, pids_with_cwd_token

REPO = Path(__file__).resolve().parents[1]
needs_namespaces = pytest.mark.skipif(not namespaces_available()[0], reason="no namespaces on this machine")
needs_seccomp = pytest.mark.skipif(seccomp_program() is None, reason=f"no seccomp filter for {os.uname().machine}")


def bare(isolation: str = "auto", seccomp: bool = True) -> SandboxLimits:
    return SandboxLimits(timeout_s=3, memory_mb=512, audit_hook=False, seccomp=seccomp, isolation=isolation)


def check(code: str, limits: SandboxLimits):
    r = run_program(code, limits)
    assert r.passed, (code, r)
    return r


@needs_namespaces
def test_the_private_root_shows_only_the_interpreter_and_the_working_directory():
    stdlib = os.path.dirname(os.__file__)
    code = (
        "import os, sys\n"
        "top = set(os.listdir('/'))\n"
        "assert top <= {'sandbox', 'dev', 'etc', 'usr', 'lib', 'lib64', 'root', 'opt', 'home'}, top\n"
        "for p in ('/proc', '/sys', '/tmp', '/etc/shadow', '/etc/passwd', '/home', "
        f"{str(REPO)!r}, {str(REPO / 'README.md')!r}):\n"
        "    assert not os.path.exists(p), p\n"
        "assert os.getcwd() == '/sandbox' and os.listdir('.') == [], os.listdir('.')\n"
        f"assert os.path.isfile({os.path.join(stdlib, 'os.py')!r})\n"
        "assert set(os.listdir('/dev')) <= {'null', 'zero', 'full', 'random', 'urandom'}\n"
        "assert 'OPENAI_API_KEY' not in os.environ\n"
    )
    r = check(code, bare())
    assert r.isolation == "namespaces" and r.network_isolated


@needs_namespaces
def test_outside_the_working_directory_nothing_is_writable():
    stdlib = os.path.dirname(os.__file__)
    code = (
        "import errno, os\n"
        f"for p in ('/x', '/dev/x', {os.path.join(stdlib, 'x.py')!r}, '/usr/lib/x'):\n"
        "    try:\n"
        "        open(p, 'w')\n"
        "    except OSError as e:\n"
        "        assert e.errno in (errno.EROFS, errno.EACCES, errno.ENOENT, errno.EPERM), (p, e)\n"
        "    else:\n"
        "        raise AssertionError(p)\n"
        "try:\n"
        f"    os.remove({os.path.join(stdlib, 'os.py')!r})\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('removed os.py')\n"
        "open('inside.txt', 'w').write('ok')\n"
        "assert open('inside.txt').read() == 'ok'\n"
    )
    check(code, bare())
    assert os.path.isfile(os.path.join(stdlib, "os.py"))


@needs_namespaces
def test_no_capabilities_and_no_network_even_without_seccomp():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        code = (
            "import os, socket\n"
            "calls = (lambda: os.setuid(1), lambda: os.chroot('/sandbox'),\n"
            "         lambda: os.mknod('n', 0o600 | 0o020000, 0x0103))\n"
            "for call in calls:\n"
            "    try:\n"
            "        call()\n"
            "    except OSError:\n"
            "        pass\n"
            "    else:\n"
            "        raise AssertionError('a privileged call worked')\n"
            "s = socket.socket()\n"
            "try:\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "except OSError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('connected to the host')\n"
        )
        check(code, bare(seccomp=False))
    finally:
        srv.close()


@needs_seccomp
@pytest.mark.parametrize("isolation", ["none", pytest.param("auto", marks=needs_namespaces)])
def test_seccomp_refuses_new_processes_and_inet_sockets(isolation):
    code = (
        "import errno, os, socket, threading\n"
        "import multiprocessing.util as u\n"
        "def refused(call):\n"
        "    try:\n"
        "        call()\n"
        "    except OSError as e:\n"
        "        return e.errno in (errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENOENT)\n"
        "    return False\n"
        "assert refused(os.fork)\n"
        "assert refused(lambda: u.spawnv_passfds(b'/bin/sh', [b'sh', b'-c', b'true'], ()))\n"
        "assert refused(lambda: os.posix_spawn('/bin/sh', ['sh', '-c', 'true'], {}))\n"
        "assert refused(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))\n"
        "a, b = socket.socketpair()\n"  # AF_UNIX stays usable
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append(1))\n"  # threads still work
        "t.start()\n"
        "t.join()\n"
        "assert out == [1]\n"
    )
    r = check(code, bare(isolation))
    assert r.seccomp


@needs_namespaces
def test_the_pid_namespace_takes_setsid_grandchildren_down():
    # fork allowed here (no seccomp, no hook): a grandchild in its own session outlives its parent; the namespace's
    # end must take it down
    token = "tok" + uuid.uuid4().hex
    code = (
        "import os, time\n"
        f"os.mkdir({token!r})\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.chdir({token!r})\n"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    try:
        check(code, bare(seccomp=False))
        assert leftovers(token, 2.0) == []
    finally:
        leftovers(token, 0.0)


@needs_namespaces
def test_a_timeout_kills_the_whole_namespace():
    token = "tok" + uuid.uuid4().hex
    code = (
        "import os, time\n"
        f"os.mkdir({token!r})\n"
        f"os.chdir({token!r})\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "time.sleep(60)\n"
    )
    try:
        r = run_program(code, SandboxLimits(timeout_s=0.5, wall_s=1.0, audit_hook=False, seccomp=False))
        assert r.status == "timeout", r
        assert leftovers(token, 2.0) == []
    finally:
        leftovers(token, 0.0)


@pytest.mark.parametrize("isolation", ["none", pytest.param("auto", marks=needs_namespaces)])
def test_the_sandbox_dies_with_the_harness(isolation, tmp_path):
    # a harness killed with SIGKILL cannot clean up: the launcher's parent-death signal has to
    token = "tok" + uuid.uuid4().hex
    code = f"import os, time\nos.mkdir({token!r})\nos.chdir({token!r})\ntime.sleep(60)\n"
    harness = ("from idlm.eval.sandbox import SandboxLimits, run_program\n"
               f"run_program({code!r}, SandboxLimits(timeout_s=30, isolation={isolation!r}))\n")
    p = subprocess.Popen([sys.executable, "-c", harness], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not pids_with_cwd_token(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_with_cwd_token(token), "the sample never started"
        p.kill()
        p.wait()
        assert leftovers(token, 3.0) == []
    finally:
        p.kill()
        leftovers(token, 0.0)


def test_without_namespaces_the_fallback_is_logged_and_still_guarded(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(sandbox, "_PROBE", {})
    monkeypatch.setenv("IDLM_SANDBOX_NO_NAMESPACES", "1")
    with caplog.at_level(logging.WARNING, logger="idlm.eval.sandbox"):
        ok, why = namespaces_available()
    assert not ok and "IDLM_SANDBOX_NO_NAMESPACES" in why
    assert any("WITHOUT namespaces" in rec.getMessage() for rec in caplog.records)
    r = run_program(f"open({str(tmp_path / 'x')!r}, 'w')\n", SandboxLimits(timeout_s=3))
    assert r.status == "blocked" and r.isolation == "none" and not r.network_isolated, r
    assert not (tmp_path / "x").exists()


def _unprivileged_prefix() -> list[str] | None:
    """A command prefix that runs the harness as uid 1000 (no capabilities) in a user namespace, if possible."""
    exe = shutil.which("unshare")
    if os.geteuid() != 0 or exe is None:
        return None
    prefix = [exe, "--user", "--map-user=1000", "--map-group=1000"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


@needs_namespaces
def test_as_an_unprivileged_user_the_user_namespace_comes_first(tmp_path):
    prefix = _unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot run the harness as an unprivileged user here")
    harness = (
        "import os\nfrom idlm.eval.sandbox import SandboxLimits, namespaces_available, run_program\n"
        "assert os.geteuid() == 1000\n"
        "assert namespaces_available()[0], namespaces_available()\n"
        "code = 'import os\\nassert not os.path.exists(\\'/proc\\') and os.getcwd() == \\'/sandbox\\'\\n'\n"
        "r = run_program(code, SandboxLimits(timeout_s=3))\n"
        "assert r.passed and r.isolation == 'namespaces', r\n"
        "r = run_program('import os\\nos.fork()\\n', SandboxLimits(timeout_s=3, audit_hook=False))\n"
        "assert not r.passed and 'Operation not permitted' in r.detail, r\n"
        "print('ok')\n"
    )
    p = subprocess.run([*prefix, sys.executable, "-c", harness], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), (p.stdout, p.stderr)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_the_seccomp_program_is_well_formed():
    for machine in ("x86_64", "aarch64"):
        prog = seccomp_program(machine)
        assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 < 4096
    assert seccomp_program("sparc") is None
