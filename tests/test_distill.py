"""Distillation in the objective: the fused mixed cross-entropy against autograd, KL == 0 at initialisation,
normalisation over accumulation (over ranks: tests/test_objective_distributed.py), and no full [rows, V] logits of
either model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from idlm.config import IDLMConfig, ObjectiveConfig
from idlm.errors import UserError
from idlm.losses import IGNORE_INDEX, linear_cross_entropy_sum, linear_mixed_cross_entropy_sum
from idlm.objective import Teacher, global_target_counts, idlm_loss
from tests.helpers import random_batch, tiny_model

VOCAB = 48
ROWS = [(3, 8, 0), (2, 3, 6), (5, 6, 0), (1, 9, 1), (4, 2, 5), (2, 7, 2)]


def _cfg(kl: float = 1.0, soft: float = 1.0, alpha: float = 0.2, stride: int = 3, accept: float = 0.0
         ) -> IDLMConfig:
    return IDLMConfig(mask_token_id=VOCAB - 1, stride=stride,
                      objective=ObjectiveConfig(alpha=alpha, distill_kl=kl, distill_soft=soft, distill_accept=accept))


@pytest.mark.parametrize("mix,accept", [(0.0, 0.0), (0.3, 0.0), (1.0, 0.0), (0.3, 2.0), (0.0, 1.0)])
def test_mixed_ce_matches_autograd_reference(mix, accept):
    torch.manual_seed(0)
    N, d, dt, V = 37, 8, 6, 50
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    th, tW = torch.randn(N, dt, dtype=torch.float64), torch.randn(V, dt, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    t[[3, 10]] = IGNORE_INDEX
    out = linear_mixed_cross_entropy_sum(h, W, t, th, tW, mix, b, chunk_size=5, accept=accept)
    grads = torch.autograd.grad(out.mixed * 1.7, (h, W, b))
    keep = t != IGNORE_INDEX
    logq = torch.log_softmax(h[keep] @ W.T + b, -1)
    p = torch.softmax(th[keep] @ tW.T, -1)
    hard = -logq.gather(1, t[keep][:, None]).sum()
    soft = -(p * logq).sum()
    gap = (1 - torch.minimum(p, logq.exp()).sum(-1)).sum()  # what sampled drafts from q miss of min(1, p/q)
    ref = (1 - mix) * hard + mix * soft + accept * gap
    torch.testing.assert_close(out.gap, gap.detach())
    ref_grads = torch.autograd.grad(ref * 1.7, (h, W, b))
    assert out.count == int(keep.sum())
    torch.testing.assert_close(out.mixed.detach(), ref.detach())
    torch.testing.assert_close(out.hard, hard.detach())
    torch.testing.assert_close(out.soft - out.entropy, (p * (p.log() - logq)).sum().detach())  # the KL
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    if mix == 0.0 and accept == 0.0:  # the plain fused CE, value and gradient
        h2 = h.detach().clone().requires_grad_(True)
        plain, _ = linear_cross_entropy_sum(h2, W.detach(), t, b.detach(), chunk_size=5)
        (g2,) = torch.autograd.grad(plain * 1.7, (h2,))
        torch.testing.assert_close(g2, grads[0])


def test_mixed_ce_without_targets_is_zero_on_the_graph():
    h = torch.randn(4, 3, requires_grad=True)
    out = linear_mixed_cross_entropy_sum(h, torch.randn(7, 3), torch.full((4,), IGNORE_INDEX), torch.randn(4, 2),
                                         torch.randn(7, 2), 0.5)
    assert out.count == 0 and float(out.mixed.detach()) == 0.0
    out.mixed.backward()
    assert torch.all(h.grad == 0)


def test_kl_is_zero_at_initialisation_and_has_no_gradient():
    """The teacher is the model before conversion: on the clean half KL == 0 and the KL term adds no gradient."""
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=3)
    model = tiny_model("qwen3", VOCAB)
    teacher = Teacher(copy.deepcopy(model).eval())
    out = idlm_loss(model, ids, labels, _cfg(kl=2.0, soft=0.0), mask, teacher=teacher)
    assert abs(float(out.sum_kl_clean)) < 1e-10
    out.loss.backward()
    with_kl = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    idlm_loss(model, ids, labels, _cfg(kl=0.0, soft=0.0), mask).loss.backward()
    without = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(with_kl, without, rtol=1e-9, atol=1e-12)
    assert float(out.sum_kl_noisy) == 0.0  # soft targets off: no noisy KL computed


def test_loss_is_the_documented_combination():
    """loss = (1 - s) CE_noisy + s KL_noisy + w CE_clean + k KL_clean, each over its normaliser."""
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=4)
    model = tiny_model("qwen3", VOCAB)
    teacher = Teacher(tiny_model("qwen3", VOCAB, seed=5))
    s, k, w = 0.6, 1.5, 0.3
    out = idlm_loss(model, ids, labels, _cfg(kl=k, soft=s, alpha=w), mask, teacher=teacher)
    want = ((1 - s) * out.sum_noisy + s * out.sum_kl_noisy) / out.n_noisy \
        + (w * out.sum_clean + k * out.sum_kl_clean) / out.n_clean
    torch.testing.assert_close(out.loss.detach(), want)
    assert float(out.sum_kl_noisy) > 0 and float(out.sum_kl_clean) > 0


def test_the_acceptance_term_is_the_documented_combination_and_lowers_the_gap():
    """loss += a * gap_noisy / N_noisy, gap = 1 - sum_x min(p, q) per noisy target; a few steps on it alone
    (soft and hard targets off) raise the noisy rows' overlap with the teacher."""
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=8)
    model = tiny_model("qwen3", VOCAB)
    teacher = Teacher(tiny_model("qwen3", VOCAB, seed=9))
    s, a, k, w = 0.4, 3.0, 1.0, 0.2
    out = idlm_loss(model, ids, labels, _cfg(kl=k, soft=s, alpha=w, accept=a), mask, teacher=teacher)
    want = ((1 - s) * out.sum_noisy + s * out.sum_kl_noisy + a * out.sum_gap_noisy) / out.n_noisy \
        + (w * out.sum_clean + k * out.sum_kl_clean) / out.n_clean
    torch.testing.assert_close(out.loss.detach(), want)
    assert 0 < float(out.sum_gap_noisy) < out.n_noisy
    off = idlm_loss(model, ids, labels, _cfg(kl=k, soft=s, alpha=w), mask, teacher=teacher)
    torch.testing.assert_close(off.sum_gap_noisy, out.sum_gap_noisy)  # logged either way
    # the gap term alone: a mixture weight of 1 on the soft CE would also close it, so train on gap + clean CE
    cfg = IDLMConfig(mask_token_id=VOCAB - 1, stride=3,
                     objective=ObjectiveConfig(alpha=0.0, distill_kl=1.0, distill_soft=1.0, distill_accept=50.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for _ in range(25):
        opt.zero_grad()
        o = idlm_loss(model, ids, labels, cfg, mask, teacher=teacher)
        first = float(o.sum_gap_noisy) / o.n_noisy if first is None else first
        o.loss.backward()
        opt.step()
    assert float(o.sum_gap_noisy) / o.n_noisy < first - 0.02


def test_accumulation_equals_one_big_batch_with_teacher():
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=6)
    cfg = _cfg(kl=1.0, soft=0.5, accept=2.0)
    teacher = Teacher(tiny_model("qwen3", VOCAB, seed=7))
    model = tiny_model("qwen3", VOCAB)
    full = idlm_loss(model, ids, labels, cfg, mask, teacher=teacher)
    full.loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n_noisy, n_clean = global_target_counts([labels[:2], labels[2:]])
    total = 0.0
    for sl in (slice(0, 2), slice(2, None)):
        part = idlm_loss(model, ids[sl], labels[sl], cfg, mask[sl], num_noisy=n_noisy, num_clean=n_clean,
                         teacher=teacher)
        part.loss.backward()
        total += float(part.loss)
    assert abs(total - float(full.loss)) < 1e-10
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_of_student_or_teacher():
    vocab = 4096
    rows = [(4, 60, 0), (6, 50, 10)]
    ids, labels, mask = random_batch(rows, vocab, seed=2)
    model = tiny_model("qwen3", vocab, dtype=torch.float32)
    teacher = Teacher(tiny_model("qwen3", vocab, dtype=torch.float32, seed=3))
    cfg = IDLMConfig(mask_token_id=vocab - 1, stride=4, objective=ObjectiveConfig(distill_kl=1.0, distill_soft=1.0,
                                                                              distill_accept=1.0))
    chunk = 16
    with _LargestTensor() as probe:
        out = idlm_loss(model, ids, labels, cfg, mask, chunk_size=chunk, teacher=teacher)
        out.loss.backward()
    targets = out.n_noisy + out.n_clean
    assert targets * vocab > 8 * chunk * vocab  # a full [rows, V] block would be far larger than one chunk
    assert probe.largest <= max(chunk * vocab, *(p.numel() for p in model.parameters()))


def test_objective_settings_are_checked():
    with pytest.raises(UserError, match="distill_soft"):
        ObjectiveConfig(distill_soft=1.5)
    with pytest.raises(UserError, match="distill_kl"):
        ObjectiveConfig(distill_kl=float("nan"))
    with pytest.raises(UserError, match="distill_accept"):
        ObjectiveConfig(distill_accept=-1.0)
    assert ObjectiveConfig(distill_accept=1.0).uses_teacher
    with pytest.raises(UserError, match="auto_balance"):
        ObjectiveConfig(auto_balance=True, distill_kl=1.0)
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=1)
    with pytest.raises(ValueError, match="no teacher"):
        idlm_loss(tiny_model("qwen3", VOCAB), ids, labels, _cfg(), mask)
