"""Benchmark data: the manifest (eval/manifest.json), the local data directory, fetching and verification.

Layout of a data directory (default ``$IDLM_DATA_DIR`` or ``./data``)::

    DATA_DIR/<folder>/<file>          e.g. data/gsm8k/test.jsonl, data/humaneval/HumanEval.jsonl.gz
    DATA_DIR/FETCHED.json             what `idlm data fetch` wrote: file -> sha256, source, time

The folder names are those of the gathered copies (``/work/shared/data``), so ``idlm data fetch --from
/work/shared/data`` copies them as they are. A loader reads the local file when present (after checking its
sha256 against the manifest, or against FETCHED.json for files without a recorded hash) and falls back to the
benchmark's hub data set otherwise (``datasets`` / ``huggingface_hub``; needs network, and a token for gated sets).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import logging
import os
import shutil
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
                     items=f.get("items"), urls=tuple(f.get("urls") or ()), unpack=bool(f.get("unpack")))
            for f in entry["files"]]


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
        raise UserError(f"{path}: sha256 {got[:16]}... does not match the manifest ({want[:16]}...); "
                        f"fetch it again with `idlm data fetch {spec.bench}`, or pass --no-verify-data to use it "
                        "anyway")


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


def hub_rows(bench: str) -> list[dict]:
    """Rows of the benchmark's hub data set (network; `datasets` / `huggingface_hub`). UserError when impossible."""
    entry = bench_entry(bench)
    hub = entry.get("hub")
    folder = entry["folder"]
    where = f"{folder}/{entry['files'][0]['name']}" if entry.get("files") else folder
    if not hub:
        raise UserError(f"{bench}: no local data ({where} under the data directory) and no hub data set; "
                        f"run `idlm data fetch {bench}` (or put the file there)")
    if _offline():
        raise UserError(f"{bench}: no local data ({where} under the data directory), and hub access is off "
                        f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/IDLM_OFFLINE); run `idlm data fetch {bench}`")
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
        raise UserError(f"{bench}: no local data and the hub fallback needs `datasets`/`huggingface_hub` ({exc}); "
                        f"install them or run `idlm data fetch {bench}`") from None
    except UserError:
        raise
    except Exception as exc:  # network, auth (gated GPQA), missing data set
        gated = " (a gated data set: accept its terms and set HF_TOKEN)" if hub.get("gated") else ""
        raise UserError(f"{bench}: no local data ({where}) and loading {hub['path']} from the hub failed{gated}: "
                        f"{type(exc).__name__}: {exc}") from None


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


def fetch(names: list[str] | None = None, data_dir: str | os.PathLike | None = None,
          source_dir: str | os.PathLike | None = None, force: bool = False) -> list[FetchResult]:
    """Download (or copy from ``source_dir``) each benchmark's files into ``data_dir`` and verify their sha256.

    A file already present with the right hash is kept (unless ``force``). A hash mismatch deletes the new copy
    and reports "failed". Files without a recorded hash get one in DATA_DIR/FETCHED.json.
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
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkstemp(prefix=f".{spec.name}.", dir=dest.parent)[1])
            source = None
            errors = []
            try:
                if source_dir is not None:
                    for cand in _candidates_in(Path(source_dir), spec):
                        if cand.is_file():
                            shutil.copyfile(cand, tmp)
                            source = str(cand)
                            break
                    else:
                        errors.append(f"not in {source_dir}")
                else:
                    for url in spec.urls:
                        try:
                            _download(url, tmp)
                            source = url
                            break
                        except Exception as exc:  # noqa: BLE001 - report and try the next URL
                            errors.append(f"{url}: {type(exc).__name__}: {exc}")
                    if not spec.urls:
                        hub = bench_entry(bench).get("hub") or {}
                        errors.append("no download URL; the loader reads it from the hub "
                                      f"({hub.get('path', '?')}) or place the file by hand")
                if source is None:
                    tmp.unlink(missing_ok=True)
                    status = "missing" if source_dir is not None or not spec.urls else "failed"
                    results.append(FetchResult(bench, spec.name, dest, status, message="; ".join(errors)))
                    continue
                got = sha256_file(tmp)
                if spec.sha256 and got != spec.sha256:
                    tmp.unlink(missing_ok=True)
                    results.append(FetchResult(bench, spec.name, dest, "failed", got, source,
                                               f"sha256 {got} does not match the manifest's {spec.sha256}"))
                    continue
                os.replace(tmp, dest)
                if spec.unpack and zipfile.is_zipfile(dest):
                    with zipfile.ZipFile(dest) as z:
                        _safe_extract(z, dest.parent)
                record[rkey] = {"sha256": got, "source": source, "bench": bench,
                                "fetched": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                "verified": bool(spec.sha256)}
                _write_fetch_record(data_dir, record)
                msg = "" if spec.sha256 else "no checksum in the manifest; recorded this one in FETCHED.json"
                results.append(FetchResult(bench, spec.name, dest, "fetched", got, source, msg))
            finally:
                if tmp.exists():
                    tmp.unlink()
    return results


def _safe_extract(z: zipfile.ZipFile, dest: Path) -> None:
    root = dest.resolve()
    for member in z.infolist():
        target = (dest / member.filename).resolve()
        if root != target and root not in target.parents:
            raise UserError(f"refusing to unpack {member.filename!r}: it points outside {dest}")
    z.extractall(dest)


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
