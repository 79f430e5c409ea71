"""R-ISD under SGLang (inference/sglang_isd/gated_lora.py), without SGLang: the gated LoRA wrapped around fused
projections laid out as SGLang's Llama/Qwen layers are (qkv_proj, o_proj, gate_up_proj, down_proj returning
``(output, bias)``) equals PEFT's LoRA on MASK rows and leaves every other row bit-identical to the base."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from idlm.errors import UserError
from idlm.inference.sglang_isd.gated_lora import GatedLoRALinear, install_gated_lora, read_peft_adapter
from idlm.lora import load_gated_lora, save_gated_lora
from tests.helpers import tiny_model

VOCAB, MASK = 41, 40


class FusedLinear(torch.nn.Module):
    """SGLang-style linear layer: fused weight, returns (output, bias), takes extra keyword arguments."""

    def __init__(self, *weights: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.cat(weights, dim=0).clone())

    def forward(self, x, forward_batch=None):
        return x @ self.weight.t(), None


class FusedModel(torch.nn.Module):
    """The attribute layout SGLang's Qwen3ForCausalLM gives its projections, built from an HF model's weights."""

    def __init__(self, hf):
        super().__init__()
        layers = torch.nn.ModuleList()
        for hl in hf.model.layers:
            a, m = hl.self_attn, hl.mlp
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            layer.self_attn.qkv_proj = FusedLinear(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            layer.self_attn.o_proj = FusedLinear(a.o_proj.weight)
            layer.mlp = torch.nn.Module()
            layer.mlp.gate_up_proj = FusedLinear(m.gate_proj.weight, m.up_proj.weight)
            layer.mlp.down_proj = FusedLinear(m.down_proj.weight)
            layers.append(layer)
        self.model = torch.nn.Module()
        self.model.layers = layers

    def forward(self, input_ids, positions, forward_batch, xs):
        """Run every projection on the given inputs (one per projection), as a decoder forward would."""
        outs = []
        for layer, (x_attn, x_o, x_mlp, x_down) in zip(self.model.layers, xs):
            outs.append((layer.self_attn.qkv_proj(x_attn)[0], layer.self_attn.o_proj(x_o)[0],
                         layer.mlp.gate_up_proj(x_mlp)[0], layer.mlp.down_proj(x_down, forward_batch=None)[0]))
        return outs


@pytest.fixture(scope="module")
def hf_and_adapter(tmp_path_factory):
    torch.manual_seed(0)
    hf = tiny_model("qwen3", vocab_size=VOCAB, hidden_size=32, initializer_range=0.3, seed=7)
    path = tmp_path_factory.mktemp("gated_lora_sglang")
    save_gated_lora(hf, path, stride=3, mask_token_id=MASK, rank=4, init_std=0.3, seed=0)
    return hf, path


def _inputs(hf, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg = hf.config
    q_dim = cfg.num_attention_heads * cfg.head_dim
    dt = next(hf.parameters()).dtype
    return [tuple(torch.randn(rows, d, generator=g, dtype=dt) for d in (cfg.hidden_size, q_dim, cfg.hidden_size,
                                                               cfg.intermediate_size))
            for _ in hf.model.layers]


def test_gated_lora_matches_peft_on_mask_rows_and_base_elsewhere(hf_and_adapter):
    hf, adapter = hf_and_adapter
    fused = FusedModel(hf)
    base_fused = copy.deepcopy(fused)
    gate = install_gated_lora(fused, adapter, MASK)
    input_ids = torch.tensor([5, MASK, 7, MASK, MASK, 3, 9])  # an ISD step: verify rows and MASK rows mixed
    xs = _inputs(hf, len(input_ids), seed=1)
    got = fused(input_ids, None, None, xs)
    assert torch.equal(gate.mask, input_ids == MASK)
    base = base_fused(input_ids, None, None, xs)

    peft_model, _ = load_gated_lora(copy.deepcopy(hf), str(adapter))
    peft_model.idlm_lora_gate.enabled = False  # LoRA on every row: the reference for the MASK rows
    on = input_ids == MASK
    for li, layer in enumerate(peft_model.model.layers):
        a, m = layer.self_attn, layer.mlp
        x_attn, x_o, x_mlp, x_down = xs[li]
        with torch.no_grad():
            want = (torch.cat([a.q_proj(x_attn), a.k_proj(x_attn), a.v_proj(x_attn)], -1), a.o_proj(x_o),
                    torch.cat([m.gate_proj(x_mlp), m.up_proj(x_mlp)], -1), m.down_proj(x_down))
        for g, b, w in zip(got[li], base[li], want):
            assert torch.equal(g[~on], b[~on])  # verify rows: the base projection, bit for bit
            torch.testing.assert_close(g[on], w[on], rtol=1e-5, atol=1e-5)  # MASK rows: base + LoRA, as PEFT
            assert not torch.allclose(g[on], b[on])  # and the adapter does change them


def test_wrapped_layers_keep_sglang_calling_convention(hf_and_adapter):
    hf, adapter = hf_and_adapter
    fused = FusedModel(hf)
    install_gated_lora(fused, adapter, MASK)
    layer = fused.model.layers[0]
    for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(module, GatedLoRALinear)
    fused.forward(torch.tensor([1, 2]), None, None, _inputs(hf, 2, seed=2))  # sets the gate
    out = layer.mlp.down_proj(torch.randn(2, hf.config.intermediate_size, dtype=hf.dtype), forward_batch=None)
    assert isinstance(out, tuple) and out[1] is None
    with pytest.raises(RuntimeError, match="does not match"):
        layer.self_attn.o_proj(torch.randn(3, hf.config.num_attention_heads * hf.config.head_dim, dtype=hf.dtype))


def test_adapter_scale_and_refusals(hf_and_adapter, tmp_path):
    hf, adapter = hf_and_adapter
    weights, scale = read_peft_adapter(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert scale == cfg["lora_alpha"] / cfg["r"]
    assert len(weights) == 7 * len(hf.model.layers)
    # an adapter that adapts q_proj without k/v cannot be laid onto SGLang's fused qkv_proj
    partial = tmp_path / "partial"
    save_gated_lora(hf, partial, stride=3, mask_token_id=MASK, rank=2, init_std=0.1,
                    target_modules=("q_proj", "o_proj"))
    with pytest.raises(UserError, match="fuses q_proj/k_proj/v_proj"):
        install_gated_lora(FusedModel(hf), partial, MASK)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        read_peft_adapter(dora)
    with pytest.raises(UserError, match="no adapter_config.json"):
        read_peft_adapter(tmp_path)
