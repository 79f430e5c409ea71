"""idlm.chat: one encoding of a conversation for every caller (generate, the server, evaluation hooks, data
generation), with and without a chat template, and one set of stop ids."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from idlm.chat import ChatTemplateError, encode_messages, encode_prompt, stop_token_ids
from idlm.training.tiny_assets import build_tiny_assets


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_assets(tmp_path_factory.mktemp("chat"))["base"])


def test_template_path_is_the_generation_prompt(tok):
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}]
    want = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)
    assert encode_messages(tok, msgs) == want
    assert encode_prompt(tok, "What is 2 plus 2?") == want  # generate's prompt == the server's one-message chat


def test_fallback_without_a_template_is_the_same_for_prompt_and_chat(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    ids = encode_prompt(plain, "hello")
    assert ids == encode_messages(plain, [{"role": "user", "content": "hello"}])
    assert plain.decode(ids, skip_special_tokens=True).endswith("user: hello\nassistant:")
    assert encode_prompt(plain, "hello", chat_template=False) == list(plain("hello").input_ids)


def test_template_refusal_is_a_chat_template_error(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        encode_messages(strict, [{"role": "user", "content": "x"}])


def test_stop_ids_from_tokenizer_and_model_deduplicated():
    tok = SimpleNamespace(eos_token_id=2)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7]),
                            config=SimpleNamespace(eos_token_id=9))
    assert stop_token_ids(tok, model) == (2, 7, 9)
    assert stop_token_ids(SimpleNamespace(eos_token_id=None)) == ()
