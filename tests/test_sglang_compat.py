"""The integration against SGLang 0.5.15 itself, on CPU.

* The patches of `compat` (the verify attention kernel swap with a stand-in backend; the paper's spelling through
  SGLang's own hook registry; where a multi-token step ends a request, around SGLang's own finish check compiled
  from its source: against the same check fed one token at a time, and with ISD's sampled steps against the exact
  AR distribution) and the plugin's registration with SGLang's own algorithm registry.
* ``*_pinned``: SGLang's source read against every internal the package relies on (the patches in compat.py, the
  names spec_worker.py imports and the attributes it reads, the scheduler contracts, the model layout gated_lora.py
  wraps). They fail when SGLang moves.

SGLang is not installed in the CPU environment: the tests read the pinned wheel's source, which scripts/test.sh
fetches (`tests/sglang_source.py`), or an installed SGLang; they skip, saying so, when neither is there.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
import types
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Union

import pytest
import torch

from idlm.inference.sglang_isd import compat
from idlm.inference.sglang_isd.compat import ENV_VERIFY_ATTENTION, gqa_verify_fwd, select_verify_attention
from idlm.inference.sglang_isd.config import SGLANG_VERSION
from idlm.inference.sglang_isd.gated_lora import FUSED_PROJECTIONS
from tests.sglang_source import MISSING_REASON, read_source, run_with_sglang, source_root, source_version

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "inference" / "sglang_isd"
SRC = source_root()
needs_source = pytest.mark.skipif(SRC is None, reason=MISSING_REASON)


# ------------------------------------------------------------------------------------ compat 2: verify attention
def _triton_like_backend(calls=None):
    def splitkv(*args, **kwargs):
        if calls is not None:
            calls.append((args, kwargs))
        return True

    return SimpleNamespace(use_verify_splitkv=False, verify_splitkv_fwd=splitkv)


def test_verify_attention_default_is_the_gqa_kernel_and_splitkv_by_env(monkeypatch):
    monkeypatch.delenv(ENV_VERIFY_ATTENTION, raising=False)
    backend = _triton_like_backend()
    original = backend.verify_splitkv_fwd
    assert select_verify_attention(backend) == "gqa"
    assert backend.use_verify_splitkv is True and backend.verify_splitkv_fwd is not original
    monkeypatch.setenv(ENV_VERIFY_ATTENTION, "splitkv")
    backend = _triton_like_backend()
    original = backend.verify_splitkv_fwd
    assert select_verify_attention(backend) == "splitkv"
    assert backend.use_verify_splitkv is True and backend.verify_splitkv_fwd is original


def test_verify_attention_prefill_by_env_and_bad_value(monkeypatch):
    monkeypatch.setenv(ENV_VERIFY_ATTENTION, "prefill")
    backend = _triton_like_backend()
    assert select_verify_attention(backend) == "prefill"
    assert backend.use_verify_splitkv is False
    with pytest.raises(ValueError, match="must be one of"):
        select_verify_attention(backend, "fast")


def test_verify_attention_left_alone_on_other_backends(monkeypatch):
    monkeypatch.delenv(ENV_VERIFY_ATTENTION, raising=False)
    flashinfer_like = SimpleNamespace()
    assert select_verify_attention(flashinfer_like) == "backend"
    assert not hasattr(flashinfer_like, "use_verify_splitkv")
    no_kernel = SimpleNamespace(use_verify_splitkv=False, verify_splitkv_fwd=None)
    assert select_verify_attention(no_kernel, "gqa") == "backend"
    assert no_kernel.use_verify_splitkv is False


def _verify_args(batch=2, rows=7, heads=8, kv_heads=2, dim=16):
    q = torch.zeros(batch * rows, heads, dim)
    k = torch.zeros(batch * rows, kv_heads, dim)
    buf = torch.zeros(10, kv_heads, dim)
    indptr = torch.tensor([0, 3, 6], dtype=torch.int32)
    return [q, k, k.clone(), torch.empty_like(q), buf, buf.clone(), indptr, indptr, torch.arange(6), None, True,
            indptr, rows, 1.0, 1.0, 0.25]


def test_gqa_kernel_takes_isd_shape_and_hands_the_rest_back(monkeypatch):
    pytest.importorskip("triton")
    import idlm.inference.sglang_isd.verify_attention as va

    ran = []
    monkeypatch.setattr(va, "isd_verify_attention", lambda *a: ran.append(a))
    calls = []
    backend = _triton_like_backend(calls)
    assert select_verify_attention(backend, "gqa") == "gqa" and backend.use_verify_splitkv
    assert backend.verify_splitkv_fwd(*_verify_args()) is True
    assert len(ran) == 1 and ran[0][8] == 7 and ran[0][9] == 0.25 and not calls  # rows, scale; no fallback
    for change in (dict(sinks=torch.zeros(8)), dict(logit_cap=30.0), dict(sliding_window_size=128)):
        assert backend.verify_splitkv_fwd(*_verify_args(), **change) is True
    args = _verify_args()
    args[13] = 0.5  # an fp8 KV scale
    backend.verify_splitkv_fwd(*args)
    args = _verify_args()
    args[12] = 5  # rows that do not tile the batch uniformly
    backend.verify_splitkv_fwd(*args)
    assert len(ran) == 1 and len(calls) == 5  # everything but ISD's plain shape went to SGLang's kernel


# ------------------------------------------------------------------------ plugin + compat 1 in SGLang's registries
_REGISTER = """
import json, logging, os, sys, types
from dataclasses import dataclass
from idlm.inference.sglang_isd import compat, plugin
from idlm.inference.sglang_isd.config import ENV_CONFIG, validate_server_args
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

plugin.register()
plugin.register()  # SGLang calls it in the launcher and in every scheduler process: the second call is a no-op
algo = SpeculativeAlgorithm.from_string("isd")
out = {"name": algo.name, "overlap": algo.supports_overlap,
       "validator": algo.validate_server_args is validate_server_args, "speculative": algo.is_speculative(),
       "eagle": algo.is_eagle(), "draft_kv": algo.has_draft_kv(),
       "hidden": algo.carries_draft_hidden_states(), "topk": algo.need_topk(),
       "hooks": [(t.name, h is compat._before_post_init) for t, h, _ in HookRegistry._hooks[compat.HOOK_TARGET]],
       "finish_hooks": [(t.name, h is compat._finish_as_ar)
                        for t, h, _ in HookRegistry._hooks[compat.FINISH_HOOK_TARGET]]}

# the hook applied by SGLang's own HookRegistry to a stand-in of ServerArgs (the real one needs SGLang's GPU-side
# dependencies): the paper's spelling must reach __post_init__ already translated
server_args = types.ModuleType("sglang.srt.server_args")
seen = {}

@dataclass
class ServerArgs:
    dllm_algorithm: str | None = None
    dllm_algorithm_config: str | None = None
    speculative_algorithm: str | None = None
    speculative_num_draft_tokens: int | None = None

    def __post_init__(self):
        seen.update(algo=self.speculative_algorithm, rows=self.speculative_num_draft_tokens, dllm=self.dllm_algorithm)

server_args.ServerArgs = ServerArgs
sys.modules["sglang.srt.server_args"] = server_args
import sglang.srt
sglang.srt.server_args = server_args
HookRegistry.apply_hooks()
ServerArgs(dllm_algorithm="IDLMBlockN", dllm_algorithm_config=os.environ["YAML"])
out["post_init"] = seen
out["env_stride"] = json.loads(os.environ[ENV_CONFIG])["stride"]
print("RESULT " + json.dumps(out))
"""


@needs_source
def test_plugin_registers_in_sglangs_own_registries(monkeypatch):
    """`plugin.register` against SGLang's real algorithm registry (which checks the spec class against its
    interface) and hook registry; the hook then translates the paper's spelling before ``__post_init__``."""
    monkeypatch.setenv("YAML", str(ROOT / "configs/inference/idlm_blockN4.yaml"))
    monkeypatch.delenv("IDLM_ISD_CONFIG", raising=False)
    proc = run_with_sglang(SRC, _REGISTER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    assert out["name"] == "ISD" and out["overlap"] is True and out["validator"] is True
    assert out["speculative"] is True and out["eagle"] is False
    assert (out["draft_kv"], out["hidden"], out["topk"]) == (False, False, False)
    assert out["hooks"] == [["BEFORE", True]]  # registered once, despite two register() calls
    assert out["finish_hooks"] == [["AROUND", True]]
    assert out["post_init"] == {"algo": "ISD", "rows": 7, "dllm": None}
    assert out["env_stride"] == 4


# --------------------------------------------------------------------------------------------------- ast helpers
def _tree(rel: str) -> ast.Module:
    return ast.parse(read_source(SRC, rel))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} is gone")


def _members(rel: str, name: str) -> set[str]:
    """Names a class of SGLang's file ``rel`` defines: fields, class attributes, methods, ``self.x = ...`` in its
    methods, and the same of its base classes defined in that file."""
    tree = _tree(rel)
    out: set[str] = set()
    todo = [name]
    while todo:
        cls = _class(tree, todo.pop())
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
            elif isinstance(node, ast.Assign):
                out.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(node.name)
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            out.update(t.attr for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                       and t.value.id == "self")
        local = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in local]
    return out


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"def {name} is gone")


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]


def _worker() -> ast.Module:
    return ast.parse((PKG / "spec_worker.py").read_text())


def _sglang_imports(tree: ast.Module) -> dict[str, str]:
    """{imported name: SGLang file it comes from} of ``from sglang... import name`` lines."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang."):
            rel = node.module[len("sglang."):].replace(".", "/") + ".py"
            out.update({a.name: rel for a in node.names})
    return out


def _reads(tree: ast.AST, var: str) -> set[str]:
    """Attributes the code reads or writes on a variable called ``var`` (``var.x``)."""
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == var}


def _self_chain(tree: ast.AST, attr: str) -> set[str]:
    """Attributes read on ``self.<attr>`` (``self.model_runner.x``)."""
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == attr
            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}


def _call_keywords(tree: ast.AST, func: str) -> set[str]:
    return {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id == func for k in n.keywords if k.arg}


# -------------------------------------------------------------------------------------------------------- pins
@needs_source
def test_sglang_version_pinned():
    assert source_version(SRC) == SGLANG_VERSION, "re-read SGLang's spec-V2 worker interface before moving the pin"
    assert f'"sglang=={SGLANG_VERSION}"' in (ROOT / "pyproject.toml").read_text()


@needs_source
def test_compat_patches_pinned():
    # 1. the paper's spelling: a BEFORE hook on ServerArgs.__post_init__ that rewrites these fields
    module, cls, method = compat.HOOK_TARGET.rsplit(".", 2)
    rel = module[len("sglang."):].replace(".", "/") + ".py"
    members = _members(rel, cls)
    assert method in members
    assert set(compat.PATCHED_FIELDS) <= members, set(compat.PATCHED_FIELDS) - members
    assert "BEFORE" in _members("srt/plugins/hook_registry.py", "HookType")
    assert "register" in _members("srt/plugins/hook_registry.py", "HookRegistry")
    # 2. the verify attention swap: the backend's two attributes, the verify path that reads them, the signature
    triton = "srt/layers/attention/triton_backend.py"
    assert {"use_verify_splitkv", "verify_splitkv_fwd"} <= _members(triton, "TritonAttnBackend")
    text = read_source(SRC, triton)
    assert "self.use_verify_splitkv\n            and forward_batch.forward_mode.is_target_verify()\n" \
           "            and self.verify_splitkv_fwd(" in text
    upstream = _function(_tree("srt/layers/attention/triton_ops/verify_splitkv.py"), "verify_splitkv_fwd")
    ours = list(inspect.signature(gqa_verify_fwd(None)).parameters)
    assert _params(upstream) == ours
    assert "def can_handle(" in read_source(SRC, "srt/layers/attention/triton_ops/verify_splitkv.py")


@needs_source
def test_capture_spec_info_hook_pinned():
    # 3. the capture verify input: the hooked method, what the hook reads of the runner, and flashinfer's use of it
    module, cls, method = compat.CAPTURE_HOOK_TARGET.rsplit(".", 2)
    rel = module[len("sglang."):].replace(".", "/") + ".py"
    tree = _tree(rel)
    assert _params(_function(_class(tree, cls), method)) == ["self", "num_tokens"]
    runner = read_source(SRC, rel)
    assert "self.num_tokens_per_bs" in runner and "self.model_runner.spec_algorithm.is_ngram()" in runner
    assert "AFTER" in _members("srt/plugins/hook_registry.py", "HookType")
    fi = "srt/layers/attention/flashinfer_backend.py"
    assert compat.FLASHINFER_BACKEND in {c.name for c in ast.walk(_tree(fi)) if isinstance(c, ast.ClassDef)}
    text = read_source(SRC, fi)
    assert "spec_info.generate_attn_arg_prefill(\n                        req_pool_indices,\n" \
           "                        paged_kernel_lens,\n                        paged_kernel_lens_sum,\n" \
           "                        self.req_to_token,\n                    )" in text
    assert "if spec_info is None:\n            assert prefix_lens is not None" in text  # the crash it avoids


@needs_source
def test_spec_worker_interface_pinned():
    """Every SGLang name spec_worker.py imports exists where it imports it from, and what it reads and writes on
    SGLang's objects is declared by their classes."""
    tree = _worker()
    imports = _sglang_imports(tree)
    assert len(imports) >= 8
    for name, rel in imports.items():
        top = {n.name for n in _tree(rel).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        assert name in top, f"{name} is no longer defined in sglang/{rel}"
    # ISDWorker implements every abstract method of BaseSpecWorker, ISDVerifyInput every one of SpecInput
    ours = {c.name: {f.name for f in c.body if isinstance(f, ast.FunctionDef)} for c in tree.body
            if isinstance(c, ast.ClassDef)}
    for cls, base, rel in (("ISDWorker", "BaseSpecWorker", "srt/speculative/base_spec_worker.py"),
                           ("ISDVerifyInput", "SpecInput", "srt/speculative/spec_info.py")):
        abstract = {f.name for f in _class(_tree(rel), base).body if isinstance(f, ast.FunctionDef)
                    and any(getattr(d, "id", getattr(d, "attr", "")) == "abstractmethod" for d in f.decorator_list)}
        assert abstract and abstract <= ours[cls], (cls, abstract - ours[cls])
    # the scheduler builds the worker with these keyword arguments
    built = [n.value for n in ast.walk(_tree("srt/managers/scheduler.py")) if isinstance(n, ast.Assign)
             and any(getattr(t, "id", None) == "draft_worker_kwargs" for t in n.targets)]
    assert len(built) == 1
    init = _function(_class(tree, "ISDWorker"), "__init__")
    assert {k.arg for k in built[0].keywords} == set(_params(init)) - {"self"}
    # class-level names (enum members) used on the imported classes
    for name, rel in imports.items():
        used = _reads(tree, name)
        if used:
            assert used <= _members(rel, name), (name, used - _members(rel, name))
    # fields and keyword arguments
    result_fields = _members("srt/managers/utils.py", "GenerationBatchResult")
    assert _call_keywords(tree, "GenerationBatchResult") <= result_fields
    assert _reads(tree, "result") - {"logits_output"} <= result_fields | {"next_token_ids"}
    assert "next_token_logits" in _members("srt/layers/logits_processor.py", "LogitsProcessorOutput")
    cache_locs = _function(_tree("srt/speculative/triton_ops/cache_locs.py"), "assign_extend_cache_locs_func")
    assert _call_keywords(tree, "assign_extend_cache_locs_func") <= set(_params(cache_locs))
    assert _params(_function(_tree("srt/speculative/spec_utils.py"), "record_stream_for_v2_verify")) == [
        "batch", "verify_input", "fwd_stream"]
    # what the worker reads on the batch, its sampling info, its requests and the target worker
    for var, rel, cls in (("batch", "srt/managers/schedule_batch.py", "ScheduleBatch"),
                          ("info", "srt/sampling/sampling_batch_info.py", "SamplingBatchInfo"),
                          ("sp", "srt/sampling/sampling_params.py", "SamplingParams"),
                          ("r", "srt/managers/schedule_batch.py", "Req")):
        used = _reads(tree, var)
        assert used and used <= _members(rel, cls), (var, used - _members(rel, cls))
    mode = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "forward_mode"}
    assert mode and mode <= _members("srt/model_executor/forward_batch_info.py", "ForwardMode"), mode
    target = _self_chain(tree, "_target_worker") | _self_chain(tree, "target_worker")
    assert target <= _members("srt/managers/tp_worker.py", "TpModelWorker"), target
    runner = _self_chain(tree, "model_runner")
    assert runner <= _members("srt/model_executor/model_runner.py", "ModelRunner"), runner
    assert {"vocab_size", "hf_config"} <= _members("srt/configs/model_config.py", "ModelConfig")
    assert "req_to_token" in _members("srt/mem_cache/memory_pool.py", "ReqToTokenPool")


# ----------------------------------------------------------------------- compat 4: where a multi-token step ends
def _committed(n_tokens: int, cap: int | None = 8, stop_strs=()):
    """A request with ``n_tokens`` output tokens, as the hook's fast-path test reads it."""
    return SimpleNamespace(output_ids=[1] * n_tokens,
                           sampling_params=SimpleNamespace(max_new_tokens=cap, stop_strs=list(stop_strs),
                                                           stop_regex_strs=[]))


def test_only_steps_where_sglangs_order_differs_from_ars_are_checked_token_by_token():
    """The hook's fast path: one-token steps and runs short of the cap without stop strings go to SGLang's check
    as they are (its scan for the first stop token is AR's rule there)."""
    from idlm.inference.sglang_isd.compat import needs_token_by_token_check as needs

    assert needs(_committed(9), 4)  # crosses the cap
    assert needs(_committed(8), 2)  # reaches it
    assert not needs(_committed(9), 1)  # AR's own step
    assert not needs(_committed(5), 3)
    assert needs(_committed(5, stop_strs=["ab"]), 3)
    assert not needs(_committed(5, cap=None), 3)


_FINISH_REASONS = ("BaseFinishReason", "FINISH_MATCHED_TOKEN", "FINISH_MATCHED_STR", "FINISHED_MATCHED_REGEX",
                   "FINISH_LENGTH")
_FINISH_METHODS = ("finished", "output_ids_through_stop", "update_finish_state", "_check_vocab_boundary_finish",
                   "_check_str_based_finish", "_check_token_based_finish", "tail_str", "_stop_match_tail_len",
                   "_locate_str_stop_finished_len")


def _sglang_finish_check() -> tuple[type, types.ModuleType]:
    """SGLang's own finish check on CPU: its finish reasons and the ``Req`` methods ``update_finish_state`` runs,
    compiled from its source onto a class that holds only what they read (``schedule_batch`` itself imports SGLang's
    GPU-side dependencies). Returns (that class, a stand-in ``schedule_batch`` module with the finish reasons)."""
    tree = _tree("srt/managers/schedule_batch.py")
    ns: dict = {"List": list, "Optional": Optional, "Union": Union, "re": re}
    for name in _FINISH_REASONS:
        exec(ast.unparse(_class(tree, name)), ns)  # SGLang's pinned source
    body: dict = {}
    for name in _FINISH_METHODS:
        exec(ast.unparse(_function(_class(tree, "Req"), name)), ns, body)
    module = types.ModuleType("sglang.srt.managers.schedule_batch")
    for name in _FINISH_REASONS:
        setattr(module, name, ns[name])
    return type("Req", (), body), module


@needs_source
def test_sampled_isd_with_a_stop_token_follows_ar_through_sglangs_finish_check(monkeypatch):
    """The path of a stop token in a served ISD request, on CPU: the stepper's multi-token steps committed the way
    SGLang's scheduler commits them (``output_ids.extend``, then ``update_finish_state(accepted)`` from SGLang's
    own source, with the hook of patch 4 around it) and returned through ``output_ids_through_stop``, as the HTTP
    response's ``output_ids``. The outputs hold nothing after the stop and have AR's exact distribution (the stop
    ends them, else the cap). The stops land inside steps, with tokens after them, both short of the cap and in the
    step that crosses it (where SGLang alone would end by length past the stop)."""
    from tests.isd_helpers import BigramModel, bigram_stepper_runs, g_test

    req_cls, schedule_batch = _sglang_finish_check()
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.schedule_batch", schedule_batch)
    original = req_cls.update_finish_state
    # the AROUND hook as SGLang's HookRegistry applies it (test_plugin_registers_in_sglangs_own_registries)
    req_cls.update_finish_state = lambda self, new_accepted_len=1: compat._finish_as_ar(original, self,
                                                                                       new_accepted_len)
    # the position's part of the logits dominates, so drafts are often accepted and the stop lands inside steps
    bigram = BigramModel.random("cpu", seed=1, token_scale=0.5, pos_scale=3.0)
    stop, cap, n = 5, 6, 20_000
    assert stop != bigram.first

    def new_req():
        req = req_cls()
        req.output_ids, req.finished_reason, req.finished_len, req.to_finish, req.grammar = [], None, None, None, None
        req.sampling_params = SimpleNamespace(max_new_tokens=cap, stop_token_ids={stop}, ignore_eos=False,
                                              stop_strs=[], stop_regex_strs=[])
        req.eos_token_ids, req.tokenizer, req.vocab_size = None, None, bigram.vocab  # --skip-tokenizer-init
        return req

    reqs = [new_req() for _ in range(n)]
    cases = Counter()

    def commit(i: int, tokens: list[int]) -> bool:
        req = reqs[i]
        req.output_ids.extend(tokens)
        req.update_finish_state(len(tokens))
        cases[len(tokens)] += 1
        end = req.finished_len
        if req.finished() and end < min(len(req.output_ids), cap) and req.output_ids[end - 1] == stop:
            # a stop with tokens after it in its step; "at the cap": the step also reached max_new_tokens (patch 4)
            cases["at the cap" if len(req.output_ids) >= cap else "short of the cap"] += 1
        return req.finished()

    bigram_stepper_runs(bigram, n, commit, seed=1)
    outs = [tuple(r.output_ids_through_stop) for r in reqs]
    assert all(stop not in o[:-1] for o in outs), [o for o in outs if stop in o[:-1]][:5]
    assert cases["short of the cap"] > 200 and cases["at the cap"] > 200, cases
    # exact: AR's outputs, each ending at the stop token or at the cap
    exact: dict[tuple[int, ...], float] = {}
    frontier = {(bigram.first,): 1.0}
    while frontier:
        prefixes, grown = list(frontier), {}
        for s, row in zip(prefixes, bigram.next_probs(prefixes)):
            for v, pv in enumerate(row):
                if pv > 0:
                    (exact if v == stop or len(s) + 1 == cap else grown)[s + (v,)] = frontier[s] * pv
        frontier = grown
    p_value, df = g_test(exact, outs)
    assert df > 50 and p_value > 1e-3, (p_value, df, Counter(len(o) for o in outs))


class _CharTokenizer:
    """Token id i decodes to one letter (stop strings over a vocabulary of 26)."""

    eos_token_id = None
    additional_stop_token_ids = None

    @staticmethod
    def decode(ids) -> str:
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def _finish_req(req_cls, cap: int, stop_ids: set[int], stop_strs: list[str], stop_regex: list[str]):
    req = req_cls()
    req.output_ids, req.finished_reason, req.finished_len, req.to_finish, req.grammar = [], None, None, None, None
    req.sampling_params = SimpleNamespace(
        max_new_tokens=cap, stop_token_ids=stop_ids, ignore_eos=False, stop_strs=stop_strs,
        stop_regex_strs=stop_regex, stop_str_max_len=max((len(x) for x in stop_strs), default=0),
        stop_regex_max_len=max((len(x) for x in stop_regex), default=0))
    req.eos_token_ids, req.tokenizer, req.vocab_size, req.decoded_text = None, _CharTokenizer(), 26, ""
    return req


def _ended(req) -> tuple:
    reason = req.finished_reason
    return tuple(req.output_ids_through_stop), type(reason).__name__, getattr(reason, "matched", None)


@needs_source
def test_multi_token_steps_end_where_ar_decoding_ends(monkeypatch):
    """SGLang's own finish check (compiled from its pinned source) with the hook around it, fed runs of 1-4 tokens
    as a speculative step commits them, ends every request where the same check fed one token at a time (AR) ends
    it: same output, same finish reason, same match. Random streams over 26 letters with a cap, stop tokens, stop
    strings and a stop regex. Without the hook, SGLang's check of a run differs from AR's in three ways: a run
    crossing the cap past a stop; a stop string completed after a stop token of the same run; two stop strings in
    one run, where the one listed first wins though the other completed first."""
    import random

    req_cls, schedule_batch = _sglang_finish_check()
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.schedule_batch", schedule_batch)
    plain = req_cls.update_finish_state
    hooked = type("HookedReq", (req_cls,), {
        "update_finish_state": lambda self, n=1: compat._finish_as_ar(plain, self, n)})
    rng = random.Random(0)
    differs = Counter()
    for case in range(3000):
        cap = rng.randint(2, 12)
        stop_ids = set(rng.sample(range(26), rng.randint(0, 2)))
        stop_strs = [_CharTokenizer.decode(rng.sample(range(6), rng.randint(1, 3))) for _ in range(rng.randint(0, 2))]
        stop_regex = ["d.e"] if case % 5 == 0 else []
        stream = [rng.randrange(6) if rng.random() < 0.8 else rng.randrange(26) for _ in range(cap + 4)]
        ar = _finish_req(req_cls, cap, stop_ids, stop_strs, stop_regex)
        for t in stream:  # AR: one token, then SGLang's check
            ar.output_ids.append(t)
            ar.update_finish_state(1)
            if ar.finished():
                break
        results = {}
        for name, cls in (("hooked", hooked), ("plain", req_cls)):
            spec, pos = _finish_req(cls, cap, stop_ids, stop_strs, stop_regex), 0
            steps = rng.getstate()
            ids = spec.output_ids
            while not spec.finished():
                n = rng.randint(1, 4)
                spec.output_ids.extend(stream[pos:pos + n])
                pos += n
                spec.update_finish_state(n)
                # the committed run stays whole, in the same list (finished_len marks the end)
                assert spec.output_ids is ids and ids == stream[:pos], (case, name)
            rng.setstate(steps) if name == "hooked" else None  # the same step sizes for both
            results[name] = _ended(spec)
        assert results["hooked"] == _ended(ar), (case, stream, cap, stop_ids, stop_strs, stop_regex, results)
        if results["plain"] != _ended(ar):
            if len(results["plain"][0]) == cap and len(_ended(ar)[0]) < cap:
                differs["past the cap"] += 1
            elif _ended(ar)[1] == "FINISH_MATCHED_TOKEN":  # a stop string completed after a stop token won
                differs["string after a stop token"] += 1
            else:  # two stop strings in one run: the one listed first won, though it completed later
                differs["string listed first"] += 1
    assert differs["past the cap"] > 50 and differs["string after a stop token"] > 5, differs
    assert differs["string listed first"] > 5, differs


@needs_source
def test_finish_hook_pinned():
    """SGLang's finish check, as the hook relies on it: the method and its signature; the length cap checked before
    stop strings and stop strings before stop tokens (the order the hook exists for, over a run of several tokens);
    the finished state it reads (``finished()``, ``to_finish``, ``finished_len``); the output ending at
    ``finished_len``; ``output_ids`` changed in place only (an out-of-vocabulary id rewritten), never replaced."""
    module, cls, method = compat.FINISH_HOOK_TARGET.rsplit(".", 2)
    rel = module[len("sglang."):].replace(".", "/") + ".py"
    tree = _tree(rel)
    fn = _function(_class(tree, cls), method)
    assert _params(fn) == ["self", "new_accepted_len"]
    text = read_source(SRC, rel)
    body = ast.get_source_segment(text, fn)
    length = body.index("if len(self.output_ids) >= self.sampling_params.max_new_tokens:")
    assert length < body.index("self._check_str_based_finish(") < body.index("self._check_token_based_finish(")
    assert "self.finished_len = self.sampling_params.max_new_tokens" in body
    assert "if self.to_finish:" in body and "if self.finished():" in body
    assert "return self.output_ids[: self.finished_len]" in text
    boundary = ast.get_source_segment(text, _function(_class(tree, cls), "_check_vocab_boundary_finish"))
    assert "self.output_ids[offset] =" in boundary
    # the hook shortens and regrows the one output list around each check: no check may replace it
    for name in ("update_finish_state", "_check_vocab_boundary_finish", "_check_str_based_finish",
                 "_check_token_based_finish", "tail_str", "_locate_str_stop_finished_len"):
        assert "self.output_ids =" not in ast.get_source_segment(text, _function(_class(tree, cls), name)), name
    assert {"to_finish", "finished_reason", "finished_len", "output_ids"} <= _members(rel, cls)
    assert "AROUND" in _members("srt/plugins/hook_registry.py", "HookType")


@needs_source
def test_scheduler_contracts_pinned():
    """What SGLang's scheduler does with a spec worker's result, as the worker and the plugin rely on it."""
    processor = read_source(SRC, "srt/managers/scheduler_components/batch_result_processor.py")
    assert "next_token_ids[i * stride : i * stride + accept_lens[i]]" in processor  # our output layout
    scheduler = read_source(SRC, "srt/managers/scheduler.py")
    assert "batch.seq_lens = batch_result.new_seq_lens" in scheduler  # the KV frontier (trim) contract
    tp = read_source(SRC, "srt/managers/tp_worker.py")
    assert "is_verify: bool = False" in tp and "if is_verify:" in tp
    triton = read_source(SRC, "srt/layers/attention/triton_backend.py")
    assert 'getattr(spec_info, "custom_mask", None) is not None' in triton  # no mask -> causal verify
    assert "is_target_verify()" in read_source(SRC, "srt/layers/logits_processor.py")  # all-row logits
    # spec_worker._NoDraftModel: the scheduler reads the draft KV pool through this chain for every non-NGRAM algorithm
    assert "draft_worker.draft_worker.draft_runner" in read_source(SRC, "srt/mem_cache/kv_cache_builder.py")
    # plugin.ISDSpecAlgo adds the methods the scheduler calls that CustomSpecAlgo lacks; re-check when it gains them
    enum = _members("srt/speculative/spec_info.py", "SpeculativeAlgorithm")
    custom = _members("srt/speculative/spec_registry.py", "CustomSpecAlgo")
    for method in ("carries_draft_hidden_states", "need_topk", "create_future_map"):
        assert method in enum and method not in custom, method
    future_map = _function(_class(_tree("srt/managers/overlap_utils.py"), "FutureMap"), "__init__")
    assert _params(future_map) == ["self", "device", "spec_algo", "req_to_token_pool", "needs_cpu_seq_lens"]
    # overlap scheduling (spec_worker.ISDVerifyInput): the relay reads these attributes of next_draft_input, the
    # scheduler sets future_indices and gathers the published frontier back into the next batch's seq_lens
    overlap = read_source(SRC, "srt/managers/overlap_utils.py")
    for attr in ("draft_input.bonus_tokens", "draft_input.topk_p", "draft_input.topk_index",
                 "draft_input.hidden_states"):
        assert attr in overlap, attr
    assert "batch.seq_lens = self.new_seq_lens_buf[fi]" in overlap
    assert "batch.spec_info.future_indices = future_indices" in scheduler
    assert "partial(\n" in scheduler and "self.future_map.publish, future_indices" in scheduler
    assert "has_been_filtered=False" in read_source(SRC, "srt/managers/schedule_batch.py")
    # config.validate_server_args (R-ISD): prefill CUDA graphs off in the flag and in the resolved config
    assert "disable_prefill_cuda_graph" in _members("srt/server_args.py", "ServerArgs")
    assert 'DISABLED = "disabled"' in read_source(SRC, "srt/model_executor/cuda_graph_config.py")


@needs_source
def test_gated_lora_layout_pinned():
    """gated_lora.FUSED_PROJECTIONS names SGLang's decoder-layer attributes (Llama / Qwen2 / Qwen3)."""
    models = {rel: read_source(SRC, f"srt/models/{rel}") for rel in ("llama.py", "qwen2.py", "qwen3.py")}
    for path in FUSED_PROJECTIONS:
        parent, attr = path.split(".")
        for rel in ("llama.py", "qwen2.py"):
            assert f"self.{parent} = " in models[rel] and f"self.{attr} = " in models[rel], (rel, path)
    assert "self.qkv_proj = " in models["qwen3.py"] and "self.mlp = Qwen3MLP(" in models["qwen3.py"]
    assert "import Qwen2MLP as Qwen3MLP" in models["qwen3.py"]  # Qwen3's MLP is Qwen2's (gate_up_proj, down_proj)


def test_compat_holds_every_patch():
    """No other module of the package assigns onto an object it did not build: the backend swap and the hook live in
    compat.py (gated_lora wraps the model instance's projections, its documented job)."""
    for path in PKG.glob("*.py"):
        if path.name in ("compat.py", "gated_lora.py"):
            continue
        text = path.read_text()
        for needle in ("verify_splitkv_fwd =", "use_verify_splitkv =", "HookRegistry"):
            assert needle not in text, (path.name, needle)

