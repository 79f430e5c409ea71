"""Benchmark data: the manifest, `idlm data fetch --from`, checksum verification, the hub fallback offline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from idlm.cli import main
from idlm.errors import UserError
from idlm.eval import data as D

FIX = Path(__file__).parent / "fixtures" / "eval" / "data"
SHARED = Path("/work/shared/data")


def test_manifest_lists_every_benchmark_with_a_folder():
    from idlm.eval.tasks import BENCHMARKS

    m = D.manifest()["benchmarks"]
    assert set(m) == set(BENCHMARKS)
    for name, entry in m.items():
        assert entry["folder"] and entry["files"], name
        for f in entry["files"]:
            assert f["sha256"] is None or len(f["sha256"]) == 64
            assert entry.get("hub") or f.get("urls"), name  # some way to get it


@pytest.fixture()
def fixture_manifest(monkeypatch):
    """The real manifest, with the fixtures' hashes for gsm8k and mbpp (so a fetch from the fixtures verifies)."""
    m = copy.deepcopy(D.manifest())
    for bench, rel in (("gsm8k", "gsm8k/test.jsonl"), ("mbpp", "mbpp/sanitized-mbpp.json")):
        m["benchmarks"][bench]["files"][0]["sha256"] = D.sha256_file(FIX / rel)
    monkeypatch.setattr(D, "manifest", lambda: m)
    return m


def test_fetch_from_dir_verifies_and_keeps_verified_copies(tmp_path, fixture_manifest, capsys):
    rc = main(["data", "fetch", "gsm8k", "mbpp", "--from", str(FIX), "--dir", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "gsm8k/test.jsonl").read_bytes() == (FIX / "gsm8k/test.jsonl").read_bytes()
    rec = json.loads((tmp_path / D.FETCH_RECORD).read_text())
    assert rec["gsm8k/test.jsonl"]["verified"] is True
    assert "fetched" in capsys.readouterr().out
    res = D.fetch(["gsm8k"], data_dir=tmp_path, source_dir=FIX)
    assert [r.status for r in res] == ["present"]
    assert D.local_file("gsm8k", tmp_path) == tmp_path / "gsm8k/test.jsonl"


def test_fetch_rejects_a_checksum_mismatch(tmp_path):
    # the fixtures are excerpts: their hashes differ from the real manifest's
    res = D.fetch(["gsm8k"], data_dir=tmp_path, source_dir=FIX)
    assert [r.status for r in res] == ["failed"] and "does not match" in res[0].message
    assert not (tmp_path / "gsm8k/test.jsonl").exists()
    assert main(["data", "fetch", "gsm8k", "--from", str(FIX), "--dir", str(tmp_path)]) == 1


def test_tampered_local_file_is_refused_by_the_loader(tmp_path, fixture_manifest):
    D.fetch(["gsm8k"], data_dir=tmp_path, source_dir=FIX)
    p = tmp_path / "gsm8k/test.jsonl"
    p.write_text(p.read_text().replace("Janet", "Jane"))
    with pytest.raises(UserError, match="sha256"):
        D.local_file("gsm8k", tmp_path)
    assert D.local_file("gsm8k", tmp_path, verify=False) == p


def test_files_without_a_manifest_hash_get_one_recorded(tmp_path):
    res = D.fetch(["lcb_v6"], data_dir=tmp_path, source_dir=FIX)
    assert res[0].status == "fetched" and "recorded" in res[0].message
    assert D.local_file("lcb_v6", tmp_path) is not None
    p = tmp_path / "livecodebench/test6.jsonl"
    p.write_text(p.read_text() + "\n")
    with pytest.raises(UserError, match="sha256"):
        D.local_file("lcb_v6", tmp_path)


def test_missing_source_and_no_url(tmp_path):
    res = D.fetch(["mmlu"], data_dir=tmp_path, source_dir=tmp_path / "empty")
    assert res[0].status == "missing"
    res = D.fetch(["mmlu"], data_dir=tmp_path)  # no URL: the loader uses the hub
    assert res[0].status == "missing" and "hub" in res[0].message


def test_hub_fallback_offline_says_what_to_do(tmp_path, monkeypatch):
    from idlm.eval.tasks import get_benchmark

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="idlm data fetch gsm8k"):
        get_benchmark("gsm8k").load(tmp_path)
    with pytest.raises(UserError, match="idlm data fetch"):
        get_benchmark("mathbench").load(tmp_path)


def test_data_list(tmp_path, capsys):
    assert main(["data", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gsm8k" in out and "missing" in out


@pytest.mark.skipif(not SHARED.is_dir(), reason="the gathered data (/work/shared/data) is not on this machine")
def test_fetch_from_the_gathered_data_matches_the_manifest(tmp_path):
    res = D.fetch(None, data_dir=tmp_path, source_dir=SHARED)
    got = {r.bench: r.status for r in res}
    for bench in ("arc_c", "gsm8k", "math500", "aime24", "aime25", "humaneval", "mbpp", "ifeval"):
        assert got[bench] == "fetched", (bench, [r for r in res if r.bench == bench])
    for row in D.status(tmp_path):
        if row["present"]:
            assert row["verified"] is True, row
