"""Chat prompts and end-of-sequence ids: one rule for `idlm generate`, the native server, the evaluation hooks and
the training-data generator, so that one message is encoded the same way everywhere.

``encode_messages`` renders messages with the tokenizer's chat template (with the generation prompt) when it has one,
else as ``role: content`` lines followed by ``assistant:``; ``stop_token_ids`` collects the tokenizer's and the model's
EOS ids.
"""

from __future__ import annotations

from typing import Any


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused the messages (e.g. roles that must alternate)."""


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ``[{"role", "content"}, ...]`` ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's raise_exception and template errors
            raise ChatTemplateError(str(exc)) from exc
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text, add_special_tokens=True))


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of one user prompt: as a one-message conversation (`encode_messages`), or with ``chat_template``
    False the raw text with the tokenizer's special tokens."""
    if chat_template:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text).input_ids)


def stop_token_ids(tokenizer, model: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids from the tokenizer and the model's generation config and config (duplicates removed)."""
    ids: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None)]
    if model is not None:
        sources += [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                    getattr(getattr(model, "config", None), "eos_token_id", None)]
    for value in sources:
        for tok in value if isinstance(value, list | tuple) else [value]:
            if isinstance(tok, int) and not isinstance(tok, bool) and tok not in ids:
                ids.append(tok)
    return tuple(ids)
