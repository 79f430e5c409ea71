"""`idlm bench train` on CPU with a tiny model: both modes run, the objective does more work than AR SFT."""

from __future__ import annotations

import argparse
import json

import pytest

from idlm.cli import main as cli_main
from idlm.training.bench import add_bench_arguments, run_bench


@pytest.fixture(scope="module")
def tiny_idlm(tmp_path_factory):
    from idlm.training.tiny_assets import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("bench"))


def _args(*argv):
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


def test_bench_reports_both_modes(tiny_idlm):
    rep = run_bench(_args("--model", tiny_idlm["idlm_base"], "--seq-len", "64", "--batch-size", "2", "--steps", "1",
                          "--warmup", "1", "--stride", "4", "--peak-tflops", "1.0"))
    res = {r["mode"]: r for r in rep["results"]}
    assert set(res) == {"objective", "ar"} and rep["device"] == "cpu" and rep["attn"] == "sdpa"
    w_obj, w_ar = rep["work"]["objective"], rep["work"]["ar"]
    assert w_obj["tokens"] == w_ar["tokens"] == 128
    # K + L: the x_t rows of the 48 response tokens per row are added to the 64 clean ones
    assert w_obj["model_tokens"] == 128 + 2 * 48
    assert w_obj["head_rows"] == 2 * (48 + 47) and w_ar["head_rows"] == 128
    for r in res.values():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_gb"] is None
    assert res["objective"]["model_tokens_per_s"] > res["objective"]["tokens_per_s"]
    assert rep["objective_step_over_ar_step"] > 0


def test_bench_cli(tiny_idlm, capsys):
    rc = cli_main(["bench", "train", "--model", tiny_idlm["idlm_base"], "--seq-len", "32", "--steps", "1",
                   "--warmup", "0", "--json", "--modes", "objective"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["mode"] for r in out["results"]] == ["objective"] and out["results"][0]["mfu"] is None
    rc = cli_main(["bench", "train", "--model", tiny_idlm["base"], "--seq-len", "32", "--steps", "1"])
    assert rc == 2 and "--mask-token-id" in capsys.readouterr().err
