"""R-ISD: a gated LoRA on a frozen base model decodes exactly the base model's greedy output."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from idlm.errors import UserError
from idlm.inference.engine import ISDEngine, SamplingParams
from idlm.lora import (
    ADAPTER_META_FILE,
    GatedLoRAConfig,
    load_gated_lora,
    save_gated_lora,
)
from idlm.tiny import build_tiny_model
from tests.helpers import tiny_model
from tests.isd_helpers import (
    naive_greedy,
    one_torch_thread,  # noqa: F401  (autouse fixture)
)

VOCAB, MASK = 41, 40
PROMPTS = [[3, 4, 5], [7], [11, 12, 13, 14, 15, 16, 17], [2, 2, 9, 30]]


@pytest.fixture(scope="module")
def base():
    return tiny_model("qwen3", vocab_size=VOCAB, hidden_size=32, initializer_range=0.3, seed=7)


@pytest.fixture(scope="module")
def adapter_dir(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("gated_lora")
    save_gated_lora(base, path, stride=3, mask_token_id=MASK, rank=4, init_std=0.3, seed=0)
    return path


@pytest.fixture()
def lora_model(base, adapter_dir):
    model, meta = load_gated_lora(copy.deepcopy(base), str(adapter_dir))
    assert meta == GatedLoRAConfig(mask_token_id=MASK, stride=3, base_model=None)
    return model


@pytest.fixture(scope="module")
def refs(base):
    return [naive_greedy(base, p, 14) for p in PROMPTS]


def test_adapter_files(adapter_dir):
    assert (adapter_dir / "adapter_config.json").exists()
    assert json.loads((adapter_dir / ADAPTER_META_FILE).read_text())["idlm"]["mask_token_id"] == MASK


@torch.no_grad()
def test_gate_keeps_verify_rows_exactly_base(base, lora_model):
    ids = torch.tensor([[3, 4, 5, 9, MASK, MASK, MASK]])
    want = base(input_ids=ids).logits
    got = lora_model(input_ids=ids).logits  # gate from the input ids: LoRA on the three MASK rows only
    assert torch.equal(got[:, :4], want[:, :4])  # bit for bit: the gated branch adds exact zeros
    assert (got[:, 4:] - want[:, 4:]).abs().max() > 1e-3  # the adapter is not a no-op on MASK rows
    gate = lora_model.idlm_lora_gate
    with gate.rows(torch.zeros_like(ids, dtype=torch.bool)):  # explicit row roles win over the ids
        assert torch.equal(lora_model(input_ids=ids).logits, want)


@torch.no_grad()
def test_bypass_runs_no_lora_branch(base, lora_model):
    """A forward without MASK rows (a prefill, an N = 1 step) skips the LoRA branches: base logits bit for bit, and
    no LoRA matmul runs (what keeps R-ISD's AR steps at the base's cost)."""
    ids = torch.tensor([[3, 4, 5, 9, 1, 2]])
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in lora_model.named_modules()
             if n.endswith("lora_A.default")]
    assert hooks
    gate = lora_model.idlm_lora_gate
    with gate.bypass():
        got = lora_model(input_ids=ids).logits
    assert torch.equal(got, base(input_ids=ids).logits) and not calls
    lora_model(input_ids=ids)  # outside the block the branches run again (gated by the ids: zeros here)
    assert calls and all(not layer._disable_adapters for layer in gate._layers)
    for h in hooks:
        h.remove()


def test_risd_greedy_equals_base_greedy(lora_model, refs):
    engine = ISDEngine(lora_model, None, 3, MASK, max_batch_size=3)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=14)) for p in PROMPTS]
    stats = [engine.request_stats(i) for i in ids]
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert [final[i].token_ids for i in ids] == refs
    assert sum(s.rejections for s in stats) > 0


def test_ungated_lora_changes_the_output(lora_model, refs):
    """Without the gate (LoRA on every row) verify rows no longer compute the base model: the test has teeth."""
    lora_model.idlm_lora_gate.enabled = False
    engine = ISDEngine(lora_model, None, 3, MASK, max_batch_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=14))
    assert [o.token_ids for o in outs] != refs


def test_from_pretrained_base_plus_adapter(tmp_path):
    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    model, tokenizer = build_tiny_model(base_dir, arch="qwen3", free_rows=4, dtype=torch.float64, init_std=0.3)
    meta = save_gated_lora(str(base_dir), adapter, stride=4, rank=2, init_std=0.2)
    assert meta.mask_token_id == len(tokenizer)  # the first free embedding row
    engine = ISDEngine.from_pretrained(str(base_dir), lora=str(adapter), device="cpu")
    assert engine.stride == 4 and engine.mask_token_id == len(tokenizer)
    prompt = tokenizer("What is 2 plus 3?").input_ids
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == naive_greedy(model, prompt, 12)


def test_adapter_errors(tmp_path, base):
    llama_dir = tmp_path / "llama"
    build_tiny_model(llama_dir, arch="llama", free_rows=0, tie=True)
    with pytest.raises(UserError, match="no free embedding row"):
        save_gated_lora(str(llama_dir), tmp_path / "a")
    meta = save_gated_lora(str(llama_dir), tmp_path / "b", mask_token_id=5, rank=2)  # an existing token doubles as MASK
    assert meta.mask_token_id == 5
    with pytest.raises(UserError, match="not a directory"):
        load_gated_lora(copy.deepcopy(base), str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=ADAPTER_META_FILE):
        load_gated_lora(copy.deepcopy(base), str(tmp_path / "plain"))
    with pytest.raises(UserError, match="not an embedding row"):
        save_gated_lora(base, tmp_path / "c", mask_token_id=VOCAB)
