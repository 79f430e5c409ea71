"""`spec_worker.ISDWorker` on CPU, driven the way SGLang's scheduler drives it.

SGLang's GPU-side modules cannot be imported on a CPU machine, so the nine names the worker imports from SGLang are
stand-ins here (`_install_stand_ins`); tests/test_sglang_compat.py::test_spec_worker_interface_pinned checks those
names, the fields and the attributes the worker uses against SGLang's own source. The target worker is a miniature
(`FakeTarget`): a paged KV cache that holds token ids, a tiny HF model recomputed over what that cache holds plus
the step rows (so a wrong KV frontier or a wrong row layout changes the output), and logits padded past the
vocabulary as SGLang's are. The driver commits what SGLang's result processor commits:
``next_token_ids[i * R : i * R + accept_lens[i]]`` and ``seq_lens = new_seq_lens``.
"""

from __future__ import annotations

import enum
import importlib
import logging
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from idlm.errors import UserError
from tests.helpers import tiny_model

VOCAB = 64
MASK = VOCAB - 1
PADDED = VOCAB + 8  # SGLang's logits can be wider than the vocabulary (padding the worker must cut off)
SLOTS, MAX_LEN = 8, 96
WORKER = "idlm.inference.sglang_isd.spec_worker"


# ------------------------------------------------------------------------------------------------ SGLang stand-ins
class ForwardMode(enum.IntEnum):
    EXTEND = 1
    DECODE = 2
    TARGET_VERIFY = 3
    IDLE = 4

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_idle(self) -> bool:
        return self == ForwardMode.IDLE


class CaptureHiddenMode(enum.IntEnum):
    NULL = 0


class SpecInputType(enum.IntEnum):
    NGRAM_VERIFY = 1


class SpecInput:
    def __init__(self, spec_input_type: SpecInputType):
        self.spec_input_type = spec_input_type


@dataclass
class GenerationBatchResult:
    logits_output: Any = None
    next_token_ids: Any = None
    can_run_cuda_graph: bool = False
    accept_lens: Any = None
    new_seq_lens: Any = None
    next_draft_input: Any = None
    speculative_num_draft_tokens: int | None = None


def assign_extend_cache_locs_func(req_pool_indices, req_to_token, start_offset, end_offset, batch_size,
                                  draft_token_num, device):
    """SGLang's semantics: the KV slots ``req_to_token[slot, start:end]`` of every request, concatenated."""
    locs = [req_to_token[s, a:b] for s, a, b in zip(req_pool_indices.tolist(), start_offset.tolist(),
                                                      end_offset.tolist())]
    out = torch.cat(locs)
    assert out.numel() == batch_size * draft_token_num
    return out


STAND_INS = {
    "sglang.srt.managers.schedule_batch": {"ScheduleBatch": SimpleNamespace},
    "sglang.srt.managers.utils": {"GenerationBatchResult": GenerationBatchResult},
    "sglang.srt.model_executor.forward_batch_info": {"CaptureHiddenMode": CaptureHiddenMode,
                                                     "ForwardMode": ForwardMode},
    "sglang.srt.speculative.base_spec_worker": {"BaseSpecWorker": object},
    "sglang.srt.speculative.spec_info": {"SpecInput": SpecInput, "SpecInputType": SpecInputType},
    "sglang.srt.speculative.spec_utils": {"record_stream_for_v2_verify": lambda batch, verify_input, stream: None},
    "sglang.srt.speculative.triton_ops.cache_locs": {"assign_extend_cache_locs_func": assign_extend_cache_locs_func},
}


def _install_stand_ins(mp: pytest.MonkeyPatch) -> None:
    for name, attrs in STAND_INS.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in sys.modules:
                mp.setitem(sys.modules, parent, types.ModuleType(parent))
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        mp.setitem(sys.modules, name, module)


@pytest.fixture(scope="module")
def sw():
    """The spec_worker module imported over the stand-ins; removed again afterwards (nothing else sees them)."""
    import idlm.inference.sglang_isd as pkg

    with pytest.MonkeyPatch.context() as mp:
        _install_stand_ins(mp)
        mp.delitem(sys.modules, WORKER, raising=False)
        mp.setattr(torch.cuda, "current_stream", lambda *a, **k: None)  # the worker hands it to record_stream
        module = importlib.import_module(WORKER)
        yield module
        sys.modules.pop(WORKER, None)
        if getattr(pkg, "spec_worker", None) is module:
            delattr(pkg, "spec_worker")


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB, seed=3, initializer_range=0.4)


# ------------------------------------------------------------------------------------------------ the miniature
class FakeTarget:
    """SGLang's target worker in miniature: KV location -> token id, the model recomputed over the cached tokens."""

    def __init__(self, model, mask_token_id: int = MASK, rows_off: int = 0):
        self.model = model
        self.req_to_token = torch.arange(SLOTS * MAX_LEN).view(SLOTS, MAX_LEN)  # (slot, position) -> KV location
        self.kv = torch.full((SLOTS * MAX_LEN,), -1, dtype=torch.long)
        self.rows_off = rows_off  # > 0: return that many logit rows too many (a broken TARGET_VERIFY contract)
        hf_config = SimpleNamespace(idlm={"mask_token_id": mask_token_id, "stride": 3})
        self.model_runner = SimpleNamespace(device="cpu", dtype=torch.float32, model=model, attn_backend=object(),
                                            model_config=SimpleNamespace(vocab_size=VOCAB, hf_config=hf_config))

    def get_memory_pool(self):
        return SimpleNamespace(req_to_token=self.req_to_token), None

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=ids[None]).logits[0].float()
        return torch.cat([logits, torch.full((logits.shape[0], PADDED - VOCAB), 1e4)], dim=1)

    def forward_batch_generation(self, batch, is_verify: bool = False) -> GenerationBatchResult:
        slots, lens = batch.req_pool_indices.tolist(), batch.seq_lens.tolist()
        if not is_verify:  # prefill: the prompts' KV, then SGLang's sampler (greedy here) draws the first token
            firsts = []
            for req, slot, n in zip(batch.reqs, slots, lens):
                ids = torch.tensor(req.origin_input_ids)
                self.kv[self.req_to_token[slot, :n]] = ids
                firsts.append(int(self._logits(ids)[-1, :VOCAB].argmax()))
            return GenerationBatchResult(logits_output=SimpleNamespace(next_token_logits=None),
                                         next_token_ids=torch.tensor(firsts))
        assert batch.forward_mode == ForwardMode.TARGET_VERIFY and batch.spec_info.custom_mask is None
        rows = batch.spec_info.draft_token_num
        ids = batch.input_ids.view(len(slots), rows)
        positions = batch.spec_info.positions.view(len(slots), rows)
        self.kv[batch.out_cache_loc] = batch.input_ids  # the forward writes every step row's KV
        out = []
        for b, (slot, n) in enumerate(zip(slots, lens)):
            assert positions[b].tolist() == list(range(n, n + rows))
            committed = self.kv[self.req_to_token[slot, :n]]
            assert (committed >= 0).all(), "a committed position has no KV"
            out.append(self._logits(torch.cat([committed, ids[b]]))[n:])  # causal: row r sees prefix + rows <= r
        logits = torch.cat(out + [torch.zeros(self.rows_off, PADDED)])
        return GenerationBatchResult(logits_output=SimpleNamespace(next_token_logits=logits), can_run_cuda_graph=True)


def _greedy_ar(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def _worker(sw, target, rows: int = 5):
    server_args = SimpleNamespace(speculative_num_draft_tokens=rows, model_path=None)
    worker = sw.ISDWorker(server_args=server_args, gpu_id=0, tp_rank=0, dp_rank=None, moe_ep_rank=0, attn_cp_rank=0,
                          moe_dp_rank=0, nccl_port=0, target_worker=target)
    worker.alloc_memory_pool()
    worker.init_attention_backends()
    return worker


def _batch(target, prompts, slots, params):
    reqs = [SimpleNamespace(origin_input_ids=p, sampling_params=SimpleNamespace(**sp))
            for p, sp in zip(prompts, params)]
    info = SimpleNamespace(
        is_all_greedy=all(sp["top_k"] <= 1 or sp["temperature"] <= 0 for sp in params),
        temperatures=torch.tensor([sp["temperature"] for sp in params]).view(-1, 1),
        top_ks=torch.tensor([sp["top_k"] for sp in params], dtype=torch.int32),
        top_ps=torch.tensor([sp["top_p"] for sp in params]),
        penalizer_orchestrator=None, vocab_mask=None, logit_bias=None, need_min_p_sampling=False)
    return SimpleNamespace(reqs=reqs, forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.tensor(slots),
                           seq_lens=torch.tensor([len(p) for p in prompts]), sampling_info=info,
                           req_to_token_pool=SimpleNamespace(req_to_token=target.req_to_token), has_grammar=False,
                           return_logprob=False, input_ids=None, out_cache_loc=None, spec_info=None)


GREEDY = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}  # SGLang's encoding of a greedy request


def _serve(worker, batch, max_new: int):
    """SGLang's scheduler loop in miniature; returns each request's tokens and the accept lengths per step."""
    published = []
    res = worker.forward_batch_generation(batch, on_publish=published.append)
    assert res.accept_lens.tolist() == [1] * len(batch.reqs)  # prefill emits the first (pending) token
    assert torch.equal(res.new_seq_lens, batch.seq_lens) and res.speculative_num_draft_tokens == worker.rows
    outs = [[t] for t in res.next_token_ids.tolist()]
    batch.seq_lens, batch.spec_info = res.new_seq_lens, res.next_draft_input
    accepts = []
    while min(len(o) for o in outs) < max_new:
        batch.forward_mode = ForwardMode.DECODE
        res = worker.forward_batch_generation(batch, on_publish=published.append)
        assert batch.forward_mode == ForwardMode.DECODE  # restored after the verify forward
        assert published[-1] is res.new_seq_lens
        assert res.logits_output.next_token_logits is None  # released after commit
        r = res.speculative_num_draft_tokens
        assert r == worker.rows and res.next_token_ids.shape == (len(outs) * r,)
        for i, n in enumerate(res.accept_lens.tolist()):
            assert 1 <= n <= worker.cfg.stride
            outs[i] += res.next_token_ids[i * r: i * r + n].tolist()
        # the relay carries each request's new pending token: the last one it emitted
        assert res.next_draft_input.bonus_tokens.tolist() == [o[-1] for o in outs]
        assert torch.equal(res.new_seq_lens, batch.seq_lens + res.accept_lens)
        accepts += res.accept_lens.tolist()
        batch.seq_lens, batch.spec_info = res.new_seq_lens, res.next_draft_input
    return outs, accepts


PROMPTS = [[1, 5, 9, 2], [7, 3], [4, 4, 8, 1, 6, 2, 11]]


def test_worker_greedy_serving_equals_greedy_ar(sw, model, monkeypatch):
    monkeypatch.delenv("IDLM_ISD_CONFIG", raising=False)
    monkeypatch.setenv("IDLM_ISD_PROFILE", "2")
    target = FakeTarget(model)
    worker = _worker(sw, target)
    assert (worker.cfg.stride, worker.mask_token_id, worker.verify_attention) == (3, MASK, "backend")
    outs, accepts = _serve(worker, _batch(target, PROMPTS, [5, 2, 7], [GREEDY] * 3), max_new=20)
    for p, o in zip(PROMPTS, outs):
        assert o[:20] == _greedy_ar(model, p, 20)
    assert max(accepts) > 1 and min(accepts) < 3, "the run must exercise both acceptance and rejection"
    assert worker.profiler is not None and worker.profiler.steps > 0
    # the same slots again (new requests, or retracted ones coming back): prefill resets their ISD state
    again = [[9, 9, 1], [2, 6, 5, 3], [8]]
    outs, _ = _serve(worker, _batch(target, again, [2, 7, 5], [GREEDY] * 3), max_new=12)
    for p, o in zip(again, outs):
        assert o[:12] == _greedy_ar(model, p, 12)


@pytest.mark.parametrize("draft_mode", ["argmax", "sample"])
def test_worker_sampled_batch_keeps_greedy_requests_exact(sw, model, monkeypatch, draft_mode):
    monkeypatch.setenv("IDLM_ISD_CONFIG", f'{{"stride": 3, "draft_mode": "{draft_mode}", "seed": 1}}')
    target = FakeTarget(model)
    worker = _worker(sw, target)
    assert (worker.state.q_probs is not None) == (draft_mode == "sample")
    params = [{"temperature": 0.8, "top_k": 1 << 30, "top_p": 0.9}, GREEDY, {"temperature": 1.2, "top_k": 20,
                                                                               "top_p": 1.0}]
    outs, _ = _serve(worker, _batch(target, PROMPTS, [0, 3, 6], params), max_new=16)
    assert outs[1][:16] == _greedy_ar(model, PROMPTS[1], 16)
    assert all(0 <= t < VOCAB for o in outs for t in o), "a token from the logits' padding columns"


def test_worker_refuses_what_it_cannot_serve(sw, model, monkeypatch):
    monkeypatch.delenv("IDLM_ISD_CONFIG", raising=False)
    with pytest.raises(UserError, match="odd"):
        _worker(sw, FakeTarget(model), rows=4)
    with pytest.raises(RuntimeError, match="outside the served model's vocabulary"):
        _worker(sw, FakeTarget(model, mask_token_id=VOCAB))
    plain = FakeTarget(model)
    plain.model_runner.model_config.hf_config = SimpleNamespace()
    with pytest.raises(UserError, match="not an I-DLM checkpoint"):
        _worker(sw, plain)
    broken = FakeTarget(model, rows_off=1)
    worker = _worker(sw, broken)
    batch = _batch(broken, PROMPTS[:1], [1], [GREEDY])
    with pytest.raises(RuntimeError, match="TARGET_VERIFY logits contract"):
        _serve(worker, batch, max_new=4)


def test_verify_input_keeps_relay_state_aligned(sw):
    a = sw.ISDVerifyInput(5, bonus_tokens=torch.tensor([10, 11, 12]))
    a.future_indices = torch.tensor([3, 4, 5])
    assert a.get_spec_adjust_token_coefficient() == (5, 5) and a.custom_mask is None
    a.filter_batch(torch.tensor([2, 0]))
    assert a.bonus_tokens.tolist() == [12, 10] and a.future_indices.tolist() == [5, 3]
    b = sw.ISDVerifyInput(5, bonus_tokens=torch.tensor([20]))
    b.future_indices = torch.tensor([7])
    a.merge_batch(b)
    assert a.bonus_tokens.tolist() == [12, 10, 20] and a.future_indices.tolist() == [5, 3, 7]
    with pytest.raises(RuntimeError, match="only one carries future_indices"):
        a.merge_batch(sw.ISDVerifyInput(5, bonus_tokens=torch.tensor([1])))
    empty = sw.ISDVerifyInput(5)
    empty.merge_batch(sw.ISDVerifyInput(5))  # neither carries relay state: nothing to merge
    assert empty.bonus_tokens is None and empty.future_indices is None


def test_worker_draft_side_cache_clear_and_warnings(sw, model, monkeypatch, caplog):
    monkeypatch.delenv("IDLM_ISD_CONFIG", raising=False)
    target = FakeTarget(model)
    worker = _worker(sw, target)
    assert worker.draft_worker.draft_runner.token_to_kv_pool is None  # no draft KV pool for SGLang to size
    batch = _batch(target, PROMPTS[:2], [1, 4], [GREEDY] * 2)
    batch.return_logprob = True
    with caplog.at_level(logging.WARNING, logger=WORKER):
        _serve(worker, batch, max_new=8)
    assert [r.getMessage() for r in caplog.records if "ISD ignores" in r.getMessage()] == [
        "ISD ignores logprobs (requested by a request in this batch); tokens follow temperature, top_k and top_p only"]
    assert int(worker.state.num_drafts.sum()) > 0
    worker.clear_cache_pool()
    assert int(worker.state.num_drafts.sum()) == 0


def test_verify_input_plans_flashinfer_attention(sw):
    """flashinfer's verify plan from ISD's input: each request's KV is its prefix plus its R step rows (from
    req_to_token, in order), its queries the R rows, no custom mask (flashinfer's causal mode = ISD's rule)."""
    r = 3
    req_to_token = torch.arange(4 * 20, dtype=torch.int32).view(4, 20) + 1000  # slot s, position p -> 1000 + 20 s + p
    slots, prefix = torch.tensor([2, 0], dtype=torch.int64), torch.tensor([5, 2], dtype=torch.int32)
    kv_indices, kv_indptr, qo_indptr, mask = sw.ISDVerifyInput(r).generate_attn_arg_prefill(
        slots, prefix, int(prefix.sum()), req_to_token)
    assert mask is None
    assert kv_indptr.tolist() == [0, 8, 13] and qo_indptr.tolist() == [0, 3, 6]
    assert kv_indices.dtype == torch.int32
    assert kv_indices.tolist() == req_to_token[2, :8].tolist() + req_to_token[0, :5].tolist()


def test_capture_gets_an_isd_verify_input_on_flashinfer_only(sw):
    compat = importlib.import_module("idlm.inference.sglang_isd.compat")

    class FlashInferAttnBackend:
        pass

    class TritonAttnBackend:
        pass

    def runner(backend, algo="ISD", draft=False):
        mr = SimpleNamespace(is_draft_worker=draft, spec_algorithm=SimpleNamespace(name=algo), attn_backend=backend())
        return SimpleNamespace(model_runner=mr, num_tokens_per_bs=7)

    got = compat._capture_spec_info(None, runner(FlashInferAttnBackend), 448)
    assert isinstance(got, sw.ISDVerifyInput) and got.draft_token_num == 7 and got.custom_mask is None
    for r in (runner(TritonAttnBackend), runner(FlashInferAttnBackend, algo="NGRAM"),
              runner(FlashInferAttnBackend, draft=True)):
        assert compat._capture_spec_info(None, r, 448) is None  # None: SGLang's own result stays
    assert compat._capture_spec_info("theirs", runner(FlashInferAttnBackend), 448) is None
