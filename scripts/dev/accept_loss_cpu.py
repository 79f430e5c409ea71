"""Does `distill_accept` move sampled acceptance towards the ceiling? A CPU check on a tiny synthetic I-DLM.

The AR model is a random tiny Qwen3-shaped LM with peaked next-token distributions (vocabulary 64 + a MASK row);
its own temperature-1 samples are the data. Copies of it are trained at stride N (default 2, one draft per step)
with the frozen original as teacher, the clean-half KL on, and on the noisy half either the soft targets alone
(`distill_soft` 1) or the soft targets plus the acceptance gap (`distill_accept` a). Each result is measured on
held-out teacher samples: the first draft's acceptance of sampled ISD at temperature 1 (reference engine), the
ceiling and the exact marginal's acceptance at the same contexts (`idlm.ceiling`, the vocabulary enumerated
exactly), and KL(teacher || model) on the clean rows. A proxy for the SmolLM2 runs, not a result about them.

    python scripts/dev/accept_loss_cpu.py --out accept_loss_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from idlm.ceiling import draft_ceiling  # noqa: E402
from idlm.config import IDLMConfig, ObjectiveConfig  # noqa: E402
from idlm.inference.engine import ISDEngine, SamplingParams, mean_acceptance, pooled_tpf  # noqa: E402
from idlm.losses import IGNORE_INDEX  # noqa: E402
from idlm.objective import Teacher, idlm_loss  # noqa: E402
from idlm.tiny import tiny_config  # noqa: E402

VOCAB = 65  # the last row is the MASK
MASK = VOCAB - 1


def base_model(seed: int, init: float, hidden: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3", vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, initializer_range=init,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # the AR model never writes the MASK token: its head gets a bias of -30 there (0 elsewhere)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[MASK] = -30.0
    model.lm_head = head
    return model


@torch.no_grad()
def sample(model, n: int, prompt_len: int, length: int, seed: int) -> torch.Tensor:
    """n sequences [n, prompt_len + length]: random prompts (never the MASK), then the model's T = 1 samples."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (n, prompt_len), generator=g)
    for _ in range(length):
        logits = model(input_ids=ids).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def train(model, teacher: Teacher, data: torch.Tensor, prompt_len: int, stride: int, objective: ObjectiveConfig,
          steps: int, batch: int, lr: float, seed: int) -> None:
    cfg = IDLMConfig(mask_token_id=MASK, stride=stride, objective=objective)
    labels_all = data.clone()
    labels_all[:, :prompt_len] = IGNORE_INDEX
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        out = idlm_loss(model, data[idx], labels_all[idx], cfg, torch.ones_like(data[idx]), teacher=teacher)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def measure(model, teacher_model, held: torch.Tensor, prompt_len: int, stride: int, seed: int) -> dict:
    """Sampled ISD at T = 1 on held-out prompts; the ceiling and KL at held-out contexts."""
    engine = ISDEngine(model, None, stride, MASK, max_batch_size=held.shape[0])
    prompts = [row[:prompt_len].tolist() for row in held]
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed + i, draft_mode="sample")
              for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    acc = mean_acceptance(outs, stride)
    # the ceiling at contexts c = the held-out rows cut at a few points (exact: every u enumerated)
    ceil, marg, kl, n = 0.0, 0.0, 0.0, 0
    for row in held[:64]:
        for cut in (prompt_len + 2, prompt_len + 8, prompt_len + 14):
            ctx = row[:cut][None]
            p0 = torch.softmax(teacher_model(input_ids=ctx).logits[0, -1].float(), -1)
            nxt = torch.cat([ctx.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
            p1 = torch.softmax(teacher_model(input_ids=nxt).logits[:, -1].float(), -1)
            c = draft_ceiling(p0, p1)  # every u enumerated
            ceil, marg, n = ceil + c.sampled, marg + c.marginal, n + 1
        lp = torch.log_softmax(teacher_model(input_ids=row[None]).logits[0].float(), -1)
        lq = torch.log_softmax(model(input_ids=row[None]).logits[0].float(), -1)
        kl += float((lp.exp() * (lp - lq)).sum(-1)[prompt_len - 1:-1].mean())
    return {"tpf": pooled_tpf(outs), "acceptance": acc, "ceiling": ceil / n, "marginal": marg / n, "kl_clean": kl / 64}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"].values() if "distill_accept" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for a in sorted({r["distill_accept"] for r in runs}):
        pts = sorted((r["kl_clean"], r["acceptance"][0], r["distill_kl"]) for r in runs if r["distill_accept"] == a)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"distill_accept {a:g}")
        for x, y, k in pts:
            ax.annotate(f"kl {k:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ceiling = runs[0]["ceiling"]
    marginal = runs[0]["marginal"]
    ax.axhline(ceiling, ls="--", c="gray")
    ax.text(ax.get_xlim()[0], ceiling, " ceiling (best drafter)", va="bottom", fontsize=8, color="gray")
    ax.axhline(marginal, ls=":", c="gray")
    ax.text(ax.get_xlim()[0], marginal, " exact marginal", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("KL(AR model || trained), clean rows, nats/token")
    ax.set_ylabel("first-draft acceptance, sampled ISD, T = 1")
    ax.set_title(f"tiny synthetic I-DLM, N = {result['stride']}, {result['steps']} steps, seed {result['seed']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--init", type=float, default=0.3, help="initializer range of the AR model (larger: peakier)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--accept", default="0,4,16", help="distill_accept values, comma-separated")
    ap.add_argument("--kl", default="4", help="distill_kl values (clean-half KL weight), comma-separated: each is "
                    "run with every distill_accept value, so the two trade-offs can be compared at equal KL")
    ap.add_argument("--plot", default=None, help="also draw first-draft acceptance against clean KL (PNG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    base = base_model(args.seed, args.init, args.hidden, args.layers)
    prompt_len = 4
    data = sample(base, 2048, prompt_len, 24, seed=args.seed + 1)
    held = sample(base, 256, prompt_len, 24, seed=args.seed + 2)
    teacher = Teacher(copy.deepcopy(base).eval())
    result = {"stride": args.stride, "steps": args.steps, "batch": args.batch, "lr": args.lr, "init": args.init,
              "hidden": args.hidden, "layers": args.layers,
              "seed": args.seed, "vocab": VOCAB, "machine": platform.machine(), "torch": torch.__version__,
              "runs": {}}
    result["runs"]["untrained"] = measure(base, base, held, prompt_len, args.stride, seed=10_000)
    floats = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    for k in floats(args.kl):
        for a in floats(args.accept):
            model = copy.deepcopy(base)
            obj = ObjectiveConfig(alpha=0.0, distill_kl=k, distill_soft=1.0, distill_accept=a)
            train(model, teacher, data, prompt_len, args.stride, obj, args.steps, args.batch, args.lr, args.seed)
            r = measure(model, base, held, prompt_len, args.stride, seed=10_000)
            r.update(distill_kl=k, distill_accept=a)
            result["runs"][f"kl{k:g}_accept{a:g}"] = r
            print(f"distill_kl {k:g}, distill_accept {a:g}: TPF {r['tpf']:.3f}, acceptance "
                  f"{' '.join(f'{x:.3f}' for x in r['acceptance'])} (ceiling {r['ceiling']:.3f}, exact marginal "
                  f"{r['marginal']:.3f}), KL clean {r['kl_clean']:.4f}", flush=True)
    if args.plot:
        plot(result, args.plot)
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
