"""`idlm.training.compile.compile_layers`: compiled decoder layers give the objective's loss and gradients of the
eager model (CPU inductor; the GPU speed is in docs/results/training_throughput.md)."""

import pytest
import torch

from idlm.config import IDLMConfig, ObjectiveConfig
from idlm.objective import idlm_loss
from idlm.training.compile import compile_layers, decoder_layers
from tests.helpers import tiny_model


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_compiled_layers_match_eager(grad_ckpt):
    torch.manual_seed(0)
    model = tiny_model("qwen3", 64)
    model.train()
    if grad_ckpt:  # as the 8B recipe: each compiled layer recomputed in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, 60, (2, 24))
    labels = ids.clone()
    labels[:, :6] = -100
    cfg = IDLMConfig(mask_token_id=63, stride=3, objective=ObjectiveConfig(alpha=0.5))
    eager = idlm_loss(model, ids, labels, cfg).loss
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    assert compile_layers(model) == len(decoder_layers(model))
    got = idlm_loss(model, ids, labels, cfg).loss
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_compile_layers_rejects_a_model_without_layers():
    with pytest.raises(ValueError, match="no decoder layer list"):
        compile_layers(torch.nn.Linear(2, 2))
