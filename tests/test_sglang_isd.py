"""ISD under SGLang, the parts that need no SGLang: the slot-indexed step bookkeeping against greedy AR, the YAML and
server-argument handling and the launch command. The worker is tested in tests/test_sglang_worker.py, the patches,
the registration and the pins on SGLang's source in tests/test_sglang_compat.py; the GPU tests in
tests/gpu/test_sglang_isd_gpu.py run the real server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from idlm.cli import main
from idlm.config import step_rows
from idlm.errors import UserError
from idlm.inference.sglang_isd.config import (
    ENV_CONFIG,
    ISDServeConfig,
    build_ar_launch_command,
    build_launch_command,
    grpc_port_env,
    load_isd_yaml,
    local_idlm_config,
    mask_token_id_of,
    translate_dllm_args,
    validate_server_args,
)
from idlm.inference.sglang_isd.stepper import ISDStateTable, SamplingView
from idlm.requests import is_greedy
from idlm.sampling import BatchHints
from tests.helpers import tiny_model
from tests.isd_helpers import bigram_stepper_samples, g_test

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
MASK = VOCAB - 1


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB, seed=3, initializer_range=0.4)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _greedy_ar(model, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        tok = int(_logits(model, seq)[-1].argmax())
        out.append(tok)
        seq.append(tok)
    return out


def _drive(model, prompts, stride, max_new, sampling=None, draft_mode="argmax", slots=(5, 2, 7, 0)):
    """SGLang's loop in miniature: prefill, then steps whose KV is a full recompute of the committed tokens (what the
    paged cache holds) plus the step rows. Returns outputs, per-step accept lengths and the table."""
    cfg = ISDServeConfig(stride=stride, draft_mode=draft_mode, seed=1)
    table = ISDStateTable(8, cfg, MASK, "cpu", vocab_size=VOCAB)
    slot_t = torch.tensor(slots[:len(prompts)])
    first = torch.tensor([int(_logits(model, p)[-1].argmax()) for p in prompts])
    table.on_prefill(slot_t, first)
    outs = [[int(t)] for t in first]
    seq_lens = torch.tensor([len(p) for p in prompts])
    accepts = []
    while min(len(o) for o in outs) < max_new:
        step = table.build(slot_t, seq_lens)
        assert step.input_ids.shape == (len(prompts), 2 * stride - 1)
        rows = []
        for b, p in enumerate(prompts):
            committed = list(p) + outs[b][:-1]
            assert len(committed) == int(seq_lens[b])
            assert int(step.input_ids[b, 0]) == outs[b][-1]  # the pending token leads the step
            assert step.position_ids[b, 0] == len(committed)
            rows.append(_logits(model, committed + step.input_ids[b].tolist())[len(committed):])
        res = table.commit(slot_t, step, torch.stack(rows), seq_lens, sampling)
        tokens = res.next_token_ids.view(len(prompts), -1)
        for b in range(len(prompts)):
            n = int(res.accept_lens[b])
            assert 1 <= n <= stride
            outs[b] += tokens[b, :n].tolist()
        accepts.append(res.accept_lens.tolist())
        seq_lens = res.new_seq_lens
    return outs, accepts, table


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_greedy_steps_equal_greedy_ar(model, stride):
    prompts = [[1, 5, 9, 2], [7, 3], [4, 4, 8, 1, 6, 2, 11]]
    outs, accepts, _ = _drive(model, prompts, stride, max_new=24)
    for p, o in zip(prompts, outs):
        assert o[:24] == _greedy_ar(model, p, 24)
    flat = [a for step in accepts for a in step]
    assert max(flat) > 1, "no draft was ever accepted: the test would not exercise acceptance"
    assert min(flat) < stride, "no draft was ever rejected: the test would not exercise trimming"


def test_mixed_greedy_and_sampled_requests(model):
    prompts = [[1, 5, 9, 2], [7, 3], [4, 4, 8]]
    # request 1 is greedy in SGLang's encoding (top_k = 1, temperature 1); the others sample
    sampling = SamplingView(temperatures=torch.tensor([0.8, 1.0, 1.2]), top_ks=torch.tensor([1 << 30, 1, 20]),
                            top_ps=torch.tensor([0.9, 1.0, 1.0]))
    assert sampling.greedy.tolist() == [False, True, False]
    # one rule for the tensors and for the requests' Python values (the worker's hints)
    assert [bool(is_greedy(t, k)) for k, t in ((1 << 30, 0.8), (1, 1.0), (20, 1.2), (5, 0.0))] == [False, True,
                                                                                                    False, True]
    # the worker's CPU-side hints (no device sync) must give the very same steps as reading the tensors
    hinted = SamplingView(sampling.temperatures, sampling.top_ks, sampling.top_ps,
                          hints=BatchHints.of([0.8, 0.0, 1.2], [1 << 30, 1, 20], [0.9, 1.0, 1.0], VOCAB))
    for mode in ("argmax", "sample"):
        outs, accepts, table = _drive(model, prompts, 3, max_new=16, sampling=sampling, draft_mode=mode)
        assert outs[1][:16] == _greedy_ar(model, prompts[1], 16)  # the greedy request stays exact
        assert all(0 <= t < VOCAB for o in outs for t in o)
        assert (table.q_probs is not None) == (mode == "sample")
        assert _drive(model, prompts, 3, max_new=16, sampling=hinted, draft_mode=mode)[:2] == (outs, accepts)


def test_state_is_per_slot_and_reset_on_prefill(model):
    cfg = ISDServeConfig(stride=3)
    table = ISDStateTable(4, cfg, MASK, "cpu")
    table.num_drafts[:] = 2
    table.on_prefill(torch.tensor([1, 3]), torch.tensor([10, 11]))
    assert table.num_drafts.tolist() == [2, 0, 2, 0] and table.pending[[1, 3]].tolist() == [10, 11]
    step = table.build(torch.tensor([3]), torch.tensor([5]))
    assert step.input_ids.tolist() == [[11, MASK, MASK, MASK, MASK]]  # cold start padded to 2N - 1 rows
    assert step.position_ids.tolist() == [[5, 6, 7, 8, 9]]


# ---------------------------------------------------------------------------------------------------------- config
def test_stride_and_step_rows_are_one_rule():
    """SGLang's --speculative-num-draft-tokens is idlm.config.step_rows(N) and maps back to N; the stride check is
    idlm.config's (its bounds, its message)."""
    for n in (2, 3, 4, 8):
        cfg = ISDServeConfig(stride=n)
        assert cfg.num_draft_tokens == step_rows(n) == 2 * n - 1
        assert ISDServeConfig.stride_from_num_draft_tokens(cfg.num_draft_tokens) == n
    for bad in (1, 0, True, 2.0, "4"):
        with pytest.raises(UserError, match="stride must be an integer >= 2"):
            ISDServeConfig(stride=bad)
    with pytest.raises(UserError, match="odd"):
        ISDServeConfig.stride_from_num_draft_tokens(6)
    with pytest.raises(UserError, match="means ISD stride 1: stride must be"):
        ISDServeConfig.stride_from_num_draft_tokens(1)


def test_checkpoint_idlm_block_is_read_by_idlm_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"idlm": {"mask_token_id": 5, "stride": 3}}))
    cfg = local_idlm_config(str(ckpt))
    assert (cfg.mask_token_id, cfg.stride) == (5, 3)
    assert mask_token_id_of(SimpleNamespace(), str(ckpt)) == 5  # SGLang's hf_config without the block: the file
    assert mask_token_id_of(SimpleNamespace(idlm={"mask_token_id": 9, "stride": 2})) == 9  # the served config's
    assert local_idlm_config("Qwen/Qwen3-8B") is None and local_idlm_config(None) is None  # hub ids: no access
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert local_idlm_config(str(ckpt)) is None
    with pytest.raises(UserError, match="not an I-DLM checkpoint"):
        mask_token_id_of(SimpleNamespace(), str(ckpt))
    (ckpt / "config.json").write_text(json.dumps({"idlm": {"mask_token_id": 5, "stride": 3, "typo": 1}}))
    with pytest.raises(UserError, match="unknown keys in the idlm config block"):
        local_idlm_config(str(ckpt))
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        local_idlm_config(str(ckpt))


def test_yaml_configs_load():
    for n in (2, 3, 4):
        cfg = load_isd_yaml(ROOT / f"configs/inference/idlm_blockN{n}.yaml")
        assert cfg.stride == n and cfg.num_draft_tokens == 2 * n - 1 and cfg.draft_mode == "argmax"


def test_yaml_paper_keys(tmp_path):
    f = tmp_path / "paper.yaml"
    f.write_text("gen_block_size: 4\nblock_size: 7\ntemperature: 1.0\ntop_k: 50\nuse_spec_verify: true\n")
    assert load_isd_yaml(f).stride == 4
    for bad, msg in (("gen_block_size: 4\nblock_size: 4\n", "block_size"),
                     ("gen_block_size: 4\nfast_verify: true\n", "fast_verify"),
                     ("stride: 3\nverify_alpha: 0.5\n", "verify_alpha"),
                     ("stride: 3\nwhatever: 1\n", "unknown keys"),
                     ("block_size: 7\n", "stride"),
                     ("stride: 1\n", ">= 2"),
                     ("stride: 3\ndraft_mode: paper_argmax\n", "draft_mode")):
        f.write_text(bad)
        with pytest.raises(UserError, match=msg):
            load_isd_yaml(f)
    with pytest.raises(UserError, match="does not exist"):
        load_isd_yaml(tmp_path / "missing.yaml")


def _args(**kw):
    base = dict(speculative_algorithm=None, speculative_num_draft_tokens=None, speculative_num_steps=None,
                speculative_eagle_topk=None, speculative_draft_model_path=None, disable_overlap_schedule=False,
                enable_mixed_chunk=True, enable_lora=False, lora_paths=None, pp_size=1, enable_dp_attention=False,
                disaggregation_mode="null", attention_backend="triton", speculative_adaptive=False, model_path=None,
                dllm_algorithm=None, dllm_algorithm_config=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_translate_paper_spelling(monkeypatch):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    args = _args(dllm_algorithm="IDLMBlockN", dllm_algorithm_config=str(ROOT / "configs/inference/idlm_blockN4.yaml"))
    assert translate_dllm_args(args)
    assert (args.speculative_algorithm, args.speculative_num_draft_tokens, args.dllm_algorithm) == ("ISD", 7, None)
    assert json.loads(os.environ[ENV_CONFIG])["stride"] == 4
    assert not translate_dllm_args(_args(dllm_algorithm="LowConfidence"))
    with pytest.raises(UserError, match="needs --dllm-algorithm-config"):
        translate_dllm_args(_args(dllm_algorithm="IDLMBlockN"))
    with pytest.raises(UserError, match="not supported"):
        translate_dllm_args(_args(dllm_algorithm="IDLMBlockNDraftOnly", dllm_algorithm_config="x.yaml"))


def test_validate_server_args(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    args = _args(speculative_num_draft_tokens=7)
    validate_server_args(args)
    # overlap scheduling stays on (the worker relays through SGLang's FutureMap); mixed chunks go off
    assert not args.disable_overlap_schedule and not args.enable_mixed_chunk
    off = _args(speculative_num_draft_tokens=7, disable_overlap_schedule=True)
    validate_server_args(off)
    assert off.disable_overlap_schedule
    assert (args.speculative_num_steps, args.speculative_eagle_topk) == (1, 1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"idlm": {"mask_token_id": 5, "stride": 3}}))
    args = _args(model_path=str(ckpt))
    validate_server_args(args)
    assert args.speculative_num_draft_tokens == 5
    for kw, msg in ((dict(speculative_num_draft_tokens=6), "odd"),
                    (dict(speculative_num_draft_tokens=7, enable_lora=True), "R-ISD"),
                    (dict(speculative_num_draft_tokens=7, attention_backend="torch_native"), "attention backend"),
                    (dict(model_path=str(tmp_path)), "speculative-num-draft-tokens")):
        with pytest.raises(UserError, match=msg):
            validate_server_args(_args(**kw))


def test_launch_command_and_cli(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"idlm": {"mask_token_id": 5, "stride": 3}}))
    argv, env = build_launch_command(str(ckpt), None, port=1234)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--speculative-num-draft-tokens") + 1] == "5" and "--disable-overlap-schedule" not in argv
    assert json.loads(env[ENV_CONFIG]) == {"stride": 3, "draft_mode": "argmax", "seed": 0, "fused_verify": True}
    assert main(["serve", "--engine", "sglang", "--model", str(ckpt), "--stride", "4", "--print-command",
                 "--sglang-args", "--cuda-graph-max-bs 8"]) == 0
    out = capsys.readouterr().out
    assert "--speculative-num-draft-tokens 7" in out and out.strip().endswith("--cuda-graph-max-bs 8")
    assert '"draft_mode": "argmax"' in out  # SGLang's default draft mode (idlm.requests.DEFAULT_DRAFT_MODE)
    assert main(["serve", "--engine", "sglang", "--model", str(ckpt), "--stride", "4", "--print-command",
                 "--draft-mode", "sample"]) == 0
    assert '"draft_mode": "sample"' in capsys.readouterr().out
    # the fused sampled verification (on by default) travels to the worker in the same config
    assert main(["serve", "--engine", "sglang", "--model", str(ckpt), "--print-command", "--no-fused-verify"]) == 0
    assert '"fused_verify": false' in capsys.readouterr().out
    off = ISDServeConfig(stride=3, fused_verify=False)
    assert ISDServeConfig(**json.loads(off.to_env())) == off
    assert main(["serve", "--model", str(ckpt), "--fused-verify"]) == 2
    assert "--fused-verify is an option of --engine sglang" in capsys.readouterr().err
    assert main(["serve", "--engine", "sglang", "--model", str(ckpt), "--lora", str(tmp_path)]) == 2
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert main(["serve", "--engine", "sglang", "--model", str(plain), "--stride", "2", "--print-command"]) == 2
    assert "not an I-DLM checkpoint" in capsys.readouterr().err
    # --ar: plain SGLang AR of any causal LM, the same flags, no ISD worker and no ISD environment
    argv = build_ar_launch_command(str(plain), port=1234, extra=["--mem-fraction-static", "0.2"])
    assert "--speculative-algorithm" not in argv and argv[-2:] == ["--mem-fraction-static", "0.2"]
    assert argv[argv.index("--attention-backend") + 1] == "triton"
    assert main(["serve", "--engine", "sglang", "--ar", "--model", str(plain), "--print-command",
                 "--max-batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert ENV_CONFIG not in out and "--speculative" not in out and "--max-running-requests 32" in out
    for bad in (["--stride", "4"], ["--lora", str(tmp_path)], ["--no-fused-verify"]):
        assert main(["serve", "--engine", "sglang", "--ar", "--model", str(plain), "--print-command", *bad]) == 2
        assert "--ar serves plain autoregressive decoding" in capsys.readouterr().err
    assert main(["serve", "--ar", "--model", str(plain)]) == 2
    assert "--ar is an option of --engine sglang" in capsys.readouterr().err
    assert main(["serve", "--engine", "sglang", "--adaptive-stride", "--model", str(plain), "--print-command"]) == 2
    assert "--adaptive-stride is an option of the native engine" in capsys.readouterr().err


def test_high_ports_get_a_grpc_port_sglang_accepts(tmp_path, monkeypatch, capsys):
    """SGLang 0.5.15 refuses --port P when P + 10000 > 65535 and SGLANG_GRPC_PORT is unset (a sweep's OS-chosen
    port 59915 killed its ISD server that way): such launches carry SGLANG_GRPC_PORT = P - 10000."""
    monkeypatch.delenv("SGLANG_GRPC_PORT", raising=False)
    assert grpc_port_env(55535) == {} and grpc_port_env(30000) == {}
    assert grpc_port_env(59915) == {"SGLANG_GRPC_PORT": "49915"}
    assert grpc_port_env(65535) == {"SGLANG_GRPC_PORT": "55535"}
    assert grpc_port_env(59915, {"SGLANG_GRPC_PORT": "7000"}) == {}  # the caller's choice stands
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"idlm": {"mask_token_id": 5, "stride": 3}}))
    _, env = build_launch_command(str(ckpt), None, port=59915)
    assert env["SGLANG_GRPC_PORT"] == "49915"
    for extra in ([], ["--ar"]):
        assert main(["serve", "--engine", "sglang", "--model", str(ckpt), "--port", "61000", "--print-command",
                     *extra]) == 0
        out = capsys.readouterr().out
        assert out.startswith("SGLANG_GRPC_PORT=51000 ") or " SGLANG_GRPC_PORT=51000 " in out
        assert main(["serve", "--engine", "sglang", "--model", str(ckpt), "--port", "31000", "--print-command",
                     *extra]) == 0
        assert "SGLANG_GRPC_PORT" not in capsys.readouterr().out


def test_risd_launch_command_and_server_args(tmp_path, monkeypatch, capsys):
    """R-ISD under SGLang: a plain base model plus a gated adapter; the adapter gives stride and MASK id, its path
    travels to the worker in IDLM_ISD_CONFIG, and the server arguments the gated LoRA cannot work with are refused."""
    from idlm.lora import save_gated_lora

    base = tmp_path / "base"
    tiny_model("qwen3", vocab_size=41, hidden_size=32, seed=3).save_pretrained(base)  # no idlm block
    adapter = tmp_path / "adapter"
    save_gated_lora(str(base), adapter, stride=3, mask_token_id=40, rank=2, init_std=0.1)
    argv, env = build_launch_command(str(base), None, lora=str(adapter))
    assert argv[argv.index("--speculative-num-draft-tokens") + 1] == "5"  # the adapter's stride 3
    cfg = json.loads(env[ENV_CONFIG])
    assert cfg["stride"] == 3 and Path(cfg["lora"]) == adapter.resolve()
    assert main(["serve", "--engine", "sglang", "--model", str(base), "--lora", str(adapter), "--stride", "4",
                 "--print-command"]) == 0
    assert "--speculative-num-draft-tokens 7" in capsys.readouterr().out
    monkeypatch.setenv(ENV_CONFIG, env[ENV_CONFIG])
    graphs = SimpleNamespace(prefill=SimpleNamespace(backend="tc_piecewise"), decode=SimpleNamespace(backend="full"))
    args = _args(speculative_num_draft_tokens=5, tp_size=1, enable_torch_compile=False,
                 disable_prefill_cuda_graph=False, cuda_graph_config=graphs)
    validate_server_args(args)
    assert args.disable_prefill_cuda_graph  # the gate lives in a Python wrapper: prefill stays eager
    assert graphs.prefill.backend == "disabled" and graphs.decode.backend == "full"  # decode graphs stay
    with pytest.raises(UserError, match="tensor parallel size 1"):
        validate_server_args(_args(speculative_num_draft_tokens=5, tp_size=2))
    with pytest.raises(UserError, match="R-ISD"):  # SGLang's own per-request LoRA is not the gated one
        validate_server_args(_args(speculative_num_draft_tokens=5, enable_lora=True))


def test_entry_point_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."sglang.srt.plugins"]' in text
    assert 'idlm_isd = "idlm.inference.sglang_isd.plugin:register"' in text
    assert '"sglang==0.5.15"' in text


def test_the_gpu_check_helpers_import_without_sglang(monkeypatch):
    """The helpers the GPU checks share (tests/gpu, scripts/dev/sglang_gpu_check.py) live in the package, import on a
    CPU machine without SGLang, and spell the ISD server flags from idlm.config's step rows."""
    from idlm.config import step_rows
    from idlm.inference.sglang_isd import testing

    monkeypatch.delenv("IDLM_ISD_OVERLAP", raising=False)
    assert testing.isd_flags(4) == ["--speculative-algorithm", "ISD", "--speculative-num-draft-tokens",
                                    str(step_rows(4))]
    monkeypatch.setenv("IDLM_ISD_OVERLAP", "0")
    assert testing.isd_flags(3)[-1] == "--disable-overlap-schedule"


@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_sampled_steps_follow_the_ar_distribution(mode):
    """The stepper's sampled steps (temperature 1, top-k and top-p both set, each draft mode) emit tokens from the
    exact AR distribution: a G test of 40,000 requests' first three tokens against the enumerated chain."""
    samples, exact = bigram_stepper_samples("cpu", mode, 40_000)
    p_value, df = g_test(exact, samples)
    assert df > 50 and p_value > 1e-3, (p_value, df)
