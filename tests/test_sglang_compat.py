"""The integration against SGLang 0.5.15 itself, on CPU.

* The patches of `compat` (the verify attention kernel swap with a stand-in backend; the paper's spelling through
  SGLang's own hook registry; the stop before the length cap with a stand-in request and, with ISD's sampled steps,
  around SGLang's own finish check compiled from its source) and the plugin's registration with SGLang's own
  algorithm registry.
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
       "finish_hooks": [(t.name, h is compat._stop_before_length)
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


# ----------------------------------------------------------------------- compat 4: a stop before the length cap
class _Finish:
    def __init__(self, matched):
        self.matched = matched


def _req(output_ids, cap=8, stop=(), eos=(), tok_eos=None, ignore_eos=False):
    return SimpleNamespace(
        output_ids=list(output_ids), to_finish=None, finished_reason=None, finished_len=None,
        sampling_params=SimpleNamespace(max_new_tokens=cap, stop_token_ids=set(stop), ignore_eos=ignore_eos),
        eos_token_ids=set(eos), tokenizer=SimpleNamespace(eos_token_id=tok_eos, additional_stop_token_ids=None),
        finished=lambda: False)


def test_a_stop_inside_the_step_that_reaches_the_cap_ends_the_request_there(monkeypatch):
    """SGLang checks the length cap first; the hook ends the request at a stop token before the cap (as AR), and
    leaves a single-token step, a run short of the cap, a stop at the cap's last position and ignore_eos alone."""
    import sys
    import types

    from idlm.inference.sglang_isd.compat import _stop_before_length, first_stop_before_cap

    stub = types.ModuleType("sglang.srt.managers.schedule_batch")
    stub.FINISH_MATCHED_TOKEN = _Finish
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.schedule_batch", stub)
    calls = []
    original = lambda req, n=1: calls.append(n)  # noqa: E731 (SGLang's own method)
    # a 4-token run [5, 9, 6, 7] crosses the cap of 8 with the stop token 9 at index 5: AR stops there
    req = _req([1, 2, 3, 4, 5, 9, 6, 7, 8], cap=8, stop=[9])
    assert first_stop_before_cap(req, 4) == 5
    _stop_before_length(original, req, 4)
    assert req.finished_len == 6 and req.finished_reason.matched == 9 and calls == []
    # the same through eos_token_ids and the tokenizer's EOS
    for kw in ({"eos": [9]}, {"tok_eos": 9}):
        assert first_stop_before_cap(_req([1, 2, 3, 4, 5, 9, 6, 7, 8], **kw), 4) == 5
    # left to SGLang: one token per step, a run that stays under the cap, a stop at the last capped position,
    # ignore_eos, a stop before the run
    for req, n in ((_req([1, 2, 3, 4, 5, 6, 7, 9], stop=[9]), 1),
                   (_req([1, 9, 3, 4], stop=[9]), 3),
                   (_req([1, 2, 3, 4, 5, 6, 7, 9, 1], stop=[9]), 3),
                   (_req([1, 2, 3, 4, 5, 9, 6, 7, 8], stop=[9], ignore_eos=True), 4),
                   (_req([9, 2, 3, 4, 5, 6, 7, 8], stop=[9]), 3)):
        assert first_stop_before_cap(req, n) is None
        calls.clear()
        _stop_before_length(original, req, n)
        assert calls == [n] and req.finished_len is None


_FINISH_REASONS = ("BaseFinishReason", "FINISH_MATCHED_TOKEN", "FINISH_MATCHED_STR", "FINISHED_MATCHED_REGEX",
                   "FINISH_LENGTH")
_FINISH_METHODS = ("finished", "output_ids_through_stop", "update_finish_state", "_check_vocab_boundary_finish",
                   "_check_str_based_finish", "_check_token_based_finish")


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
    req_cls.update_finish_state = lambda self, new_accepted_len=1: compat._stop_before_length(original, self,
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


@needs_source
def test_stop_before_length_hook_pinned():
    """SGLang's finish check, as the hook relies on it: the method and its signature, the length check before the
    stop tokens, a length finish keeping output_ids[:max_new_tokens], and the stop attributes `_is_stop_token`
    reads."""
    module, cls, method = compat.FINISH_HOOK_TARGET.rsplit(".", 2)
    rel = module[len("sglang."):].replace(".", "/") + ".py"
    tree = _tree(rel)
    fn = _function(_class(tree, cls), method)
    assert _params(fn) == ["self", "new_accepted_len"]
    body = ast.get_source_segment(read_source(SRC, rel), fn)
    length = body.index("if len(self.output_ids) >= self.sampling_params.max_new_tokens:")
    assert length < body.index("self._check_token_based_finish(") and "self.finished_len = self.sampling_params" \
        ".max_new_tokens" in body
    text = read_source(SRC, rel)
    assert "return self.output_ids[: self.finished_len]" in text
    check = ast.get_source_segment(text, _function(_class(tree, cls), "_check_token_based_finish"))
    for needle in ("self.sampling_params.ignore_eos", "self.sampling_params.stop_token_ids", "self.eos_token_ids",
                   "self.tokenizer.eos_token_id", "self.tokenizer.additional_stop_token_ids",
                   "FINISH_MATCHED_TOKEN(matched=token_id)", "self.finished_len = matched_pos + 1"):
        assert needle in check, needle
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

