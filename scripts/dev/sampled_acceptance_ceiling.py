"""The ceiling of sampled ISD acceptance that a target model sets (idlm.ceiling), measured on its own text.

For held-out GSM8K test questions, the base samples a continuation at the protocol; at a few cut points c of it,
the next token u is enumerated (the M likeliest under the protocol's p(u | c)), p(. | c, u) is computed for each,
and `idlm.ceiling.draft_ceiling` gives the best first-draft acceptance of any drafter that sees c but not u, for
sampled and argmax drafts. The enumerated mass misses at most 1 - mass, which is added to the bound. The mean
bound over contexts goes through `idlm.ceiling.tpf_bound` (later drafts always accepted) for the TPF no conversion
of this base can exceed at that protocol, up to one caveat: ISD's first drafts are made in the contexts that
follow a fully accepted step, which may be easier than the base's text at large.

    python scripts/dev/sampled_acceptance_ceiling.py --base outputs/demo/base --out ceiling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from idlm.ceiling import acceptance, draft_ceiling, sharpened, tpf_bound  # noqa: E402
from idlm.chat import encode_prompt, stop_token_ids  # noqa: E402
from idlm.inference.engine import ISDEngine, SamplingParams  # noqa: E402
from idlm.sampling import process_logits  # noqa: E402

TAUS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)  # draft temperatures relative to the marginal's own

PROTOCOLS = {  # name: (temperature, top_k, top_p)
    "t1": (1.0, 0, 1.0),  # the evaluation hooks' sampled measurement: the model's own distribution
    "paper": (1.0, 50, 0.95),  # the paper's serving protocol
}


def read_questions(path: str, offset: int, n: int) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows[offset: offset + n]]


@torch.no_grad()
def context_ceiling(model, context: list[int], protocol: tuple[float, int, float], top_u: int):
    """The `draft_ceiling` of one context: the base's p(u | c) over its ``top_u`` likeliest u, then p(. | c, u)."""
    temp, top_k, top_p = protocol
    out = model(input_ids=torch.tensor([context]), use_cache=True)
    p0 = process_logits(out.logits[0, -1:].float(), temp, top_k, top_p)[0]
    w, u = p0.topk(min(top_u, int((p0 > 0).sum())))
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(u))
    nxt = model(input_ids=u[:, None], past_key_values=cache, use_cache=False).logits[:, -1].float()
    p1 = process_logits(nxt, temp, top_k, top_p)
    p_bar = (w.double() @ p1.double()) / w.double().sum()
    sharp = {tau: acceptance(w, p1, sharpened(p_bar, tau)) for tau in TAUS}
    return draft_ceiling(w, p1), sharp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the target (base) model: an HF causal-LM directory")
    ap.add_argument("--gsm8k", default="data/gsm8k/test.jsonl", help="held-out questions (GSM8K test)")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--cuts", type=int, default=4, help="contexts per continuation (evenly spaced cut points)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="length of each sampled continuation")
    ap.add_argument("--top-u", type=int, default=64, help="next tokens u enumerated per context")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--protocols", default="t1,paper", help=f"comma-separated, of {sorted(PROTOCOLS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True, help="JSON to write")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.protocols.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        ap.error(f"unknown protocol(s) {unknown}; choose from {sorted(PROTOCOLS)}")

    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    prompts = [encode_prompt(tok, q) for q in read_questions(args.gsm8k, args.offset, args.prompts)]
    stop = stop_token_ids(tok, model)
    result = {"base": args.base, "gsm8k": args.gsm8k, "items": [args.offset, args.offset + len(prompts)],
              "cuts": args.cuts, "max_new_tokens": args.max_new_tokens, "top_u": args.top_u, "stride": args.stride,
              "seed": args.seed, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "protocols": {}}
    for name in names:
        temp, top_k, top_p = PROTOCOLS[name]
        t0 = time.time()
        engine = ISDEngine(model, None, 1, None, max_batch_size=len(prompts))
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temp, top_k=top_k, top_p=top_p,
                                 stop_token_ids=stop, seed=args.seed + i) for i in range(len(prompts))]
        conts = [o.token_ids for o in engine.generate(prompts, params)]
        contexts = []
        for p, c in zip(prompts, conts):
            cuts = sorted({int((j + 0.5) * len(c) / args.cuts) for j in range(args.cuts)}) if c else [0]
            contexts += [p + c[:t] for t in cuts]
        rows = []
        for ctx in tqdm(contexts, desc=f"ceiling {name}", unit="context"):
            c, sharp = context_ceiling(model, ctx, PROTOCOLS[name], args.top_u)
            rows.append({"sampled": c.sampled, "argmax": c.argmax, "marginal": c.marginal, "mass": c.mass,
                         **{f"marginal_tau{t}": v for t, v in sharp.items()}})
        n = len(rows)
        mean = {k: sum(r[k] for r in rows) / n for k in rows[0]}
        tail = 1.0 - mean["mass"]
        bound = {"sampled": min(1.0, mean["sampled"] + tail), "argmax": min(1.0, mean["argmax"] + tail)}
        result["protocols"][name] = {
            "temperature": temp, "top_k": top_k, "top_p": top_p, "contexts": n,
            "mean": mean,
            "first_draft_acceptance_bound": bound,
            "tpf_bound": {k: tpf_bound(v, args.stride) for k, v in bound.items()},
            "marginal_drafter_tpf_bound": tpf_bound(mean["marginal"], args.stride),
            "seconds": round(time.time() - t0, 1),
        }
        print(f"{name}: the marginal drafter sharpened to tau: " + ", ".join(
            f"{t}: {mean[f'marginal_tau{t}']:.3f}" for t in TAUS))
        print(f"{name}: {n} contexts, enumerated mass {mean['mass']:.3f}; first-draft acceptance at most "
              f"{bound['sampled']:.3f} sampled / {bound['argmax']:.3f} argmax (a drafter with the exact marginal: "
              f"{mean['marginal']:.3f}); TPF at N = {args.stride} at most "
              f"{tpf_bound(bound['sampled'], args.stride):.2f} sampled / "
              f"{tpf_bound(bound['argmax'], args.stride):.2f} argmax")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
