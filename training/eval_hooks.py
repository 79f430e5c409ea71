"""Evaluation hooks of a training recipe (the ``evaluate`` section): what the conversion kept and what it bought.

AR-mode quality of the converted model against the base (the model before conversion):
    kl_per_token   KL(base || converted) per token on continuations *sampled from the base* (temperature 1) of
                   held-out prompts: the expected divergence under the base's own distribution, in nats/token
    heldout_nll    mean NLL per token of the gold GSM8K solutions (human-written, never trained on)
    gsm8k_acc      greedy GSM8K accuracy on the held-out questions (the `idlm eval` scorer)
ISD on the converted model, through the reference engine (greedy and sampled), and R-ISD with the adapter stage:
    tpf, acceptance per draft position, and how many requests equal greedy AR token for token (all must).

Everything is measured on held-out prompts: GSM8K test questions, and IFEval prompts as an out-of-distribution set.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from idlm.chat import encode_prompt, stop_token_ids
from idlm.checkpoint import load_causal_lm, load_idlm
from idlm.errors import UserError
from idlm.eval.mathscore import gsm8k_equal, gsm8k_extract, gsm8k_gold
from idlm.eval.tasks import BOXED_SUFFIX
from idlm.inference.engine import ISDEngine, SamplingParams, mean_acceptance, pooled_tpf
from idlm.lora import load_gated_lora
from idlm.training.data import collate, encode_chat
from idlm.training.datacheck import iter_rows


def _log(msg: str) -> None:
    print(f"[idlm train] evaluate: {msg}", flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def read_gsm8k(path: str, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` GSM8K rows (question and gold answer) of a JSONL file."""
    rows = []
    for n, row in iter_rows(path):
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise UserError(f"{path} row {n}: a GSM8K row needs 'question' and 'answer'")
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def read_ifeval_prompts(path: str, limit: int) -> list[str]:
    """The first ``limit`` IFEval prompts of a JSONL file."""
    out = []
    for n, row in iter_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path} row {n}: an IFEval row needs a text field 'prompt'")
        out.append(row["prompt"])
        if len(out) >= limit:
            break
    return out


def decode(engine, prompts: list[list[int]], params) -> tuple[list, float]:
    _sync()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync()
    return outs, time.perf_counter() - t0


def decode_summary(outs: list, seconds: float, stride: int, reference: list | None = None) -> dict[str, Any]:
    """TPF (pooled: decode-forward tokens / decode forwards), acceptance per draft position (mean over requests),
    tokens/s of the batch, and how many requests equal ``reference`` (greedy AR) token for token."""
    tokens = sum(len(o.token_ids) for o in outs)
    s: dict[str, Any] = {"stride": stride, "requests": len(outs), "tokens": tokens,
                         "forwards": sum(o.forwards for o in outs), "tpf": pooled_tpf(outs),
                         "seconds": round(seconds, 2), "tok_s": tokens / seconds if seconds > 0 else 0.0,
                         "truncated": sum(o.finish_reason == "length" for o in outs)}
    if stride > 1:
        s["acceptance"] = mean_acceptance(outs, stride)
    if reference is not None:
        s["equal_to_ar"] = sum(o.token_ids == r.token_ids for o, r in zip(outs, reference))
    return s


@torch.no_grad()
def heldout_nll(model, tok, rows: list[dict[str, str]], max_len: int = 512, batch: int = 16) -> float:
    """Mean next-token NLL per answer token of the gold solutions (prompt tokens unsupervised), chat template."""
    total, count = 0.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(rows), batch):
        enc = [encode_chat(tok, [{"role": "user", "content": r["question"]},
                                 {"role": "assistant", "content": r["answer"]}], max_len) for r in rows[i:i + batch]]
        b = {k: v.to(model.device) for k, v in collate(enc, pad).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                         reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def sampled_continuations(model, prompts: list[list[int]], max_new_tokens: int, stop: tuple[int, ...],
                          seed: int = 0, batch: int = 32) -> list[list[int]]:
    """Continuations sampled from ``model`` at temperature 1 (no truncation): the base's own distribution."""
    engine = ISDEngine(model, None, 1, None, max_batch_size=batch)
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=stop, seed=seed + i)
              for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    return [o.token_ids for o in outs]


@torch.no_grad()
def kl_per_token(base, model, prompts: list[list[int]], continuations: list[list[int]]) -> dict[str, float]:
    """KL(base || model) per continuation token (nats), summed over the base's vocabulary; a model with more rows
    (an added MASK token) keeps its mass there, which counts against it, as it should."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for p, c in zip(prompts, continuations):
        if not c:
            continue
        ids = torch.tensor([p + c], device=device)
        lp = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1)
        lq = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        rows = slice(len(p) - 1, len(p) + len(c) - 1)  # the positions that predict continuation tokens
        lp, lq = lp[rows], lq[rows, : lp.shape[-1]]
        total += float((lp.exp() * (lp - lq)).sum())
        count += len(c)
    return {"kl_per_token": total / max(count, 1), "tokens": count}


def _gsm8k_accuracy(tok, rows: list[dict[str, str]], outs: list) -> float:
    texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    return sum(gsm8k_equal(gsm8k_gold(r["answer"]), gsm8k_extract(t)) for r, t in zip(rows, texts)) / len(rows)


def _sampled_tpf(engine: ISDEngine, prompts: list[list[int]], sec: dict[str, Any], stop, n: int
                 ) -> tuple[str, dict[str, Any]]:
    """ISD statistics of sampled decoding at the hooks' temperature (one seed per prompt), keyed as
    ``gsm8k_t{T}_n{N}``. Sampled output has no single reference, so there is no equality count."""
    sampled = [SamplingParams(max_new_tokens=sec["max_new_tokens"], temperature=sec["temperature"],
                              stop_token_ids=stop, seed=i) for i in range(len(prompts))]
    outs, dt = decode(engine, prompts, sampled)
    return f"gsm8k_t{sec['temperature']:g}_n{n}", decode_summary(outs, dt, n)


def evaluate_plan(plan, sec: dict[str, Any]) -> dict[str, Any]:
    """Run the hooks on a finished plan: the base (WORK/base, else the first stage's model), the last curriculum
    stage and, if the plan has one, the gated-LoRA adapter stage."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere: greedy ties flip less across batch shapes
    full = [st for st in plan.stages if st.settings.finetuning == "full"]
    adapters = [st for st in plan.stages if st.settings.finetuning == "gated_lora"]
    base_dir = plan.sections.get("base", {}).get("hf_dir") or plan.stages[0].lf_args["model_name_or_path"]
    dtype = sec["dtype"]
    base, tok = load_causal_lm(base_dir, dtype=dtype, device=device, attn_implementation="sdpa")
    stop = stop_token_ids(tok, base)
    rows = read_gsm8k(sec["gsm8k"], sec["limit"])
    gsm = [encode_prompt(tok, r["question"] + BOXED_SUFFIX) for r in rows]
    ife = [encode_prompt(tok, p) for p in read_ifeval_prompts(sec["ifeval"], sec["ifeval_limit"])] \
        if sec.get("ifeval") else []
    sets = {"gsm8k": gsm, **({"ifeval": ife} if ife else {})}
    bs = sec["batch_size"]
    greedy = SamplingParams(max_new_tokens=sec["max_new_tokens"], temperature=0.0, stop_token_ids=stop)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "settings": sec, "base": base_dir}

    t0 = time.time()
    base_ar = {name: decode(ISDEngine(base, tok, 1, None, max_batch_size=bs), ids, greedy)
               for name, ids in sets.items()}
    kl_prompts = gsm[: sec["kl_prompts"]]
    conts = sampled_continuations(base, kl_prompts, sec["kl_tokens"], stop, batch=bs)
    result["base_quality"] = {"heldout_nll": heldout_nll(base, tok, rows),
                              "gsm8k_acc": _gsm8k_accuracy(tok, rows, base_ar["gsm8k"][0])}
    _log(f"base: {result['base_quality']} ({time.time() - t0:.0f} s)")

    if full:
        final = full[-1].settings.output_dir
        model, _, cfg = load_idlm(final, dtype=dtype, device=device, attn_implementation="sdpa")
        conv_ar = {name: decode(ISDEngine(model, tok, 1, cfg.mask_token_id, max_batch_size=bs), ids, greedy)
                   for name, ids in sets.items()}
        q = {"heldout_nll": heldout_nll(model, tok, rows), "gsm8k_acc": _gsm8k_accuracy(tok, rows, conv_ar["gsm8k"][0]),
             **kl_per_token(base, model, kl_prompts, conts)}
        q["nll_ratio"] = q["heldout_nll"] / result["base_quality"]["heldout_nll"]
        result["converted"] = {"model": final, "quality": q, "isd": {}}
        _log(f"converted: {q}")
        for name, ids in sets.items():
            strides = sec["strides"] if name == "gsm8k" else [max(sec["strides"])]
            for n in strides:
                outs, dt = decode(ISDEngine(model, tok, n, cfg.mask_token_id, max_batch_size=bs), ids, greedy)
                s = decode_summary(outs, dt, n, conv_ar[name][0])
                result["converted"]["isd"][f"{name}_greedy_n{n}"] = s
                _log(f"ISD {name} greedy N={n}: TPF {s['tpf']:.2f}, == AR {s['equal_to_ar']}/{len(ids)}")
        n = max(sec["strides"])
        key, s = _sampled_tpf(ISDEngine(model, tok, n, cfg.mask_token_id, max_batch_size=bs), gsm, sec, stop, n)
        result["converted"]["isd"][key] = s
        _log(f"ISD gsm8k T={sec['temperature']:g} N={n}: TPF {s['tpf']:.2f}")
        del model

    if adapters:
        st = adapters[-1].settings
        gated, meta = load_gated_lora(base, st.output_dir)  # the base's own AR passes are done: gate it in place
        result["adapter"] = {"model": st.output_dir, "stride": meta.stride, "isd": {}}
        for name, ids in sets.items():
            outs, dt = decode(ISDEngine(gated, tok, meta.stride, meta.mask_token_id, max_batch_size=bs), ids, greedy)
            s = decode_summary(outs, dt, meta.stride, base_ar[name][0])
            result["adapter"]["isd"][f"{name}_greedy_n{meta.stride}"] = s
            _log(f"R-ISD {name} greedy N={meta.stride}: TPF {s['tpf']:.2f}, == base AR {s['equal_to_ar']}/{len(ids)}")
        key, s = _sampled_tpf(ISDEngine(gated, tok, meta.stride, meta.mask_token_id, max_batch_size=bs), gsm, sec,
                              stop, meta.stride)
        result["adapter"]["isd"][key] = s
        _log(f"R-ISD gsm8k T={sec['temperature']:g} N={meta.stride}: TPF {s['tpf']:.2f}")
    result["base_ar"] = {name: decode_summary(o, dt, 1) for name, (o, dt) in base_ar.items()}
    return result
