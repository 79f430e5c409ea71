"""Invariants of the [x_t | x_0] objective: AR-exact clean half, mask semantics, normalisation, no NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idlm.config import IDLMConfig, ObjectiveConfig
from idlm.losses import IGNORE_INDEX, linear_cross_entropy_sum
from idlm.objective import build_inputs, count_targets, idlm_hidden_states, idlm_loss
from tests.helpers import random_batch, tiny_model

VOCAB = 64
MASK_ID = VOCAB - 1


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_clean_half_equals_ar_model(arch, left_pad):
    model = tiny_model(arch, VOCAB)
    ids, labels, mask = random_batch([(4, 9, 0), (2, 5, 6), (7, 3, 3)], VOCAB, seed=1, left_pad=left_pad)
    inputs = build_inputs(ids, labels, MASK_ID, block_size=2, attention_mask=mask)
    with torch.no_grad():
        hidden = idlm_hidden_states(model, inputs)
        clean_logits = model.lm_head(hidden[:, inputs.num_noisy_rows:])
        ar_logits = model(input_ids=ids, attention_mask=mask, position_ids=inputs.layout.positions).logits
    valid = mask.bool()
    torch.testing.assert_close(clean_logits[valid], ar_logits[valid], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("align", ["response", "sequence"])
@pytest.mark.parametrize("stride", [2, 3, 4])
def test_mask_rows_see_what_isd_shows_them(align, stride, compact):
    """The x_t hidden state at a masked position p equals the AR model run on x_0[< block start] followed by
    MASKs up to p: exactly the context a mask row has at inference time."""
    model = tiny_model("qwen3", VOCAB)
    ids, labels, mask = random_batch([(3, 10, 0)], VOCAB, seed=2)
    cfg_block = stride - 1
    inputs = build_inputs(ids, labels, MASK_ID, block_size=cfg_block, attention_mask=mask, block_align=align,
                          compact=compact)
    rows = inputs.noisy_index[0].tolist()
    with torch.no_grad():
        hidden = idlm_hidden_states(model, inputs)
        blocks = inputs.layout.block_ids[0].tolist()
        for p in range(ids.shape[1]):
            if labels[0, p] == IGNORE_INDEX:
                continue
            start = blocks.index(blocks[p])
            ctx = torch.cat([ids[0, :start], torch.full((p - start + 1,), MASK_ID)])[None]
            # tokens of the block before p that are not supervised stay clean (sequence alignment only)
            ctx[0, start:p + 1] = torch.where(labels[0, start:p + 1] == IGNORE_INDEX, ids[0, start:p + 1], MASK_ID)
            ref = model.model(input_ids=ctx).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[0, rows.index(p)], ref, rtol=1e-10, atol=1e-10)


def test_linear_cross_entropy_matches_full_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::4] = IGNORE_INDEX
    total, count = linear_cross_entropy_sum(h, w, t, chunk_size=5)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum", ignore_index=IGNORE_INDEX)
    assert count == int((t != IGNORE_INDEX).sum())
    torch.testing.assert_close(total.double(), ref, rtol=1e-6, atol=1e-6)
    gh, gw = torch.autograd.grad(total, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_fused_gradients_scale_and_bias():
    """The gradients computed in the forward pass are rescaled by the upstream gradient, for every input (bias
    included), and no-grad calls give the same value without building them."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(30, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (23,), generator=g)
    t[1::3] = IGNORE_INDEX
    total, _ = linear_cross_entropy_sum(h * 2.0, w, t, b, chunk_size=4)
    ref = F.cross_entropy((h * 2.0) @ w.T + b, t, reduction="sum", ignore_index=IGNORE_INDEX)
    got = torch.autograd.grad(-3.0 * total, [h, w, b])
    want = torch.autograd.grad(-3.0 * ref, [h, w, b])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        plain, _ = linear_cross_entropy_sum(h * 2.0, w, t, b, chunk_size=4)
    torch.testing.assert_close(plain, ref.detach(), rtol=1e-12, atol=1e-12)


def test_loss_components_by_hand():
    """CE_noisy and CE_clean equal a direct computation from full logits on the 2L rows."""
    model = tiny_model("qwen3", VOCAB)
    ids, labels, mask = random_batch([(3, 6, 2), (5, 6, 0)], VOCAB, seed=3)
    cfg = IDLMConfig(mask_token_id=MASK_ID, stride=3, objective=ObjectiveConfig(alpha=0.5))
    out = idlm_loss(model, ids, labels, cfg, attention_mask=mask)
    inputs = build_inputs(ids, labels, MASK_ID, 2, mask)
    with torch.no_grad():
        logits = model.lm_head(idlm_hidden_states(model, inputs))
    K = inputs.num_noisy_rows
    ce = lambda lg, t: F.cross_entropy(lg.reshape(-1, VOCAB), t.reshape(-1), ignore_index=IGNORE_INDEX)
    noisy = ce(logits[:, :K], inputs.noisy_targets)
    clean = ce(logits[:, K:], inputs.clean_targets)
    torch.testing.assert_close(out.ce_noisy.double(), noisy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.ce_clean.double(), clean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), noisy + 0.5 * clean, rtol=1e-6, atol=1e-6)
    # noisy targets: masked positions whose next token is supervised; one fewer per response than clean
    assert out.n_clean - out.n_noisy == 2


@pytest.mark.parametrize("align", ["response", "sequence"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_compact_noisy_half_is_exact(align, left_pad):
    """Dropping the x_t rows that cannot matter gives the same loss and gradients, with fewer rows."""
    ids, labels, mask = random_batch([(6, 7, 0), (9, 4, 3), (2, 11, 0)], VOCAB, seed=6, left_pad=left_pad)
    labels[2, 7:9] = IGNORE_INDEX  # a user turn inside the third row
    cfg = IDLMConfig(mask_token_id=MASK_ID, stride=4, objective=ObjectiveConfig(block_align=align))
    results = []
    for compact in (False, True):
        model = tiny_model("qwen3", VOCAB)
        out = idlm_loss(model, ids, labels, cfg, mask, compact=compact)
        out.loss.backward()
        results.append((out, _grads(model)))
    (full, g_full), (small, g_small) = results
    assert float(small.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-12)
    assert (small.n_noisy, small.n_clean) == (full.n_noisy, full.n_clean)
    for a, b in zip(g_small, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    inputs = build_inputs(ids, labels, MASK_ID, 3, mask, align)
    assert inputs.num_noisy_rows < ids.shape[1]
    if align == "response":  # exactly the supervised positions
        assert inputs.num_noisy_rows == int(((labels != IGNORE_INDEX) & mask.bool()).sum(1).max())


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("objective", [ObjectiveConfig(alpha=0.2), ObjectiveConfig(alpha=1.0, auto_balance=True)])
def test_gradient_accumulation_equals_one_batch(objective):
    rows = [(3, 8, 0), (2, 4, 5), (6, 5, 0), (1, 9, 1)]
    ids, labels, mask = random_batch(rows, VOCAB, seed=4)
    cfg = IDLMConfig(mask_token_id=MASK_ID, stride=3, objective=objective)
    n_noisy, n_clean = count_targets(labels)
    model = tiny_model("qwen3", VOCAB)
    # one optimizer step uses one clean-loss weight; with auto-balance it comes from the whole batch
    weight = None
    if objective.auto_balance:
        with torch.no_grad():
            weight = idlm_loss(model, ids, labels, cfg, mask).weight
    full = idlm_loss(model, ids, labels, cfg, mask, num_noisy=n_noisy, num_clean=n_clean, weight=weight)
    full.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 3), slice(3, 4)):  # uneven micro-batches, each padded to its own length
        m = mask[sl]
        keep = int(m.sum(0).nonzero().max()) + 1
        out = idlm_loss(model, ids[sl, :keep], labels[sl, :keep], cfg, m[:, :keep],
                        num_noisy=n_noisy, num_clean=n_clean, weight=weight)
        out.loss.backward()
        total += float(out.loss.detach())
    assert total == pytest.approx(float(full.loss.detach()), rel=1e-9)
    for got, ref in zip(_grads(model), ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # teeth: per-micro-batch means (the paper trainer's normalisation) do not give the batch gradient
    model.zero_grad()
    for sl in (slice(0, 1), slice(1, 4)):
        idlm_loss(model, ids[sl], labels[sl], cfg, mask[sl], weight=weight).loss.backward()
    assert any(not torch.allclose(g / 2, r, rtol=1e-3) for g, r in zip(_grads(model), ref_grads))


def test_unsupervised_and_padding_rows_give_no_nan():
    model = tiny_model("qwen3", VOCAB, dtype=torch.float32)
    ids, labels, mask = random_batch([(4, 5, 0), (9, 0, 0), (4, 5, 0)], VOCAB, seed=5)
    mask[2] = 0  # an all-padding row
    labels[2] = IGNORE_INDEX
    for objective in (ObjectiveConfig(alpha=0.2), ObjectiveConfig(auto_balance=True)):
        cfg = IDLMConfig(mask_token_id=MASK_ID, stride=2, objective=objective)
        model.zero_grad()
        out = idlm_loss(model, ids, labels, cfg, mask)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        # a batch without any supervision: exactly zero loss and zero gradients, not NaN
        model.zero_grad()
        empty = idlm_loss(model, ids[1:], labels[1:], cfg, mask[1:])
        empty.loss.backward()
        assert float(empty.loss.detach()) == 0.0
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_loss_falls_on_tiny_data():
    """A tiny model trained with the objective on toy arithmetic chats: both loss components fall."""
    from idlm.tiny import build_tiny_model, tiny_corpus

    model, tok = build_tiny_model(free_rows=4, hidden_size=64, seed=0)
    mask_id = len(tok)
    cfg = IDLMConfig(mask_token_id=mask_id, stride=3)
    qa = [line for line in tiny_corpus(64, seed=3) if line.startswith("What")][:16]
    rows = []
    for line in qa:
        q, a = line.split("? ")
        prompt = tok.apply_chat_template([{"role": "user", "content": q + "?"}], add_generation_prompt=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        answer = tok(a + "<|im_end|>")["input_ids"]
        rows.append((prompt, answer))
    L = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id)
    labels = torch.full((len(rows), L), IGNORE_INDEX)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a)
        ids[i, : len(seq)] = seq
        labels[i, len(p): len(seq)] = torch.tensor(a)
        att[i, : len(seq)] = 1
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        out = idlm_loss(model, ids, labels, cfg, att)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((float(out.loss), float(out.ce_noisy), float(out.ce_clean)))
    first, last = history[0], history[-1]
    assert last[0] < 0.5 * first[0], history
    assert last[1] < first[1] - 1.0 and last[2] < first[2] - 1.0, history
