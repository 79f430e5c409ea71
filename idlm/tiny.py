"""Tiny offline models for tests, CI recipes and demos: a byte-level BPE tokenizer with a chat template
and a randomly initialised Qwen3- or Llama-shaped causal LM. Nothing here touches the network.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen3 uses (without the thinking parts), so LlamaFactory's qwen-style templates apply.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a one two three four five six seven eight nine ten plus minus times is answer what how many apples "
    "cat dog sat on mat and then we have left right number sum of question please think step first next so"
).split()


def tiny_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """A few KB of deterministic toy text: arithmetic questions and answers plus word salad."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))))
    return lines


def build_tiny_tokenizer(vocab_size: int = 384, seed: int = 0):
    """A PreTrainedTokenizerFast (byte-level BPE) with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, tie: bool = False, **kw):
    """A small Qwen3Config or LlamaConfig."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        eos_token_id=kw.pop("eos_token_id", None),
        pad_token_id=kw.pop("pad_token_id", None),
    )
    common.update(kw)
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny architecture {arch!r} (qwen3 or llama)")


def build_tiny_model(
    out_dir: str | Path | None = None,
    arch: str = "qwen3",
    free_rows: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.02,
):
    """Build (and save, when ``out_dir`` is given) a random causal LM and its tokenizer.

    free_rows: embedding rows beyond the tokenizer (Qwen3 has 267 unused ones; Llama-style models none).
    init_std: weight init scale; larger values make the random model's next-token distributions sharper.
    Returns (model, tokenizer).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer(seed=seed)
    cfg = tiny_config(
        arch,
        vocab_size=len(tokenizer) + free_rows,
        hidden_size=hidden_size,
        num_layers=num_layers,
        tie=tie,
        initializer_range=init_std,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model, tokenizer
