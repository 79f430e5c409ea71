"""The plain-PyTorch training loop and the chat data path."""

from __future__ import annotations

import json

import pytest

from idlm.config import IDLMConfig
from idlm.errors import UserError
from idlm.tiny import build_tiny_model, tiny_corpus
from idlm.training.data import encode_chat, load_chat_jsonl
from idlm.training.loop import LoopTrainConfig, train_loop


def test_bad_rows_name_file_and_row(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = {
        "not JSON": "{oops",
        "missing field 'messages'": json.dumps({"conversations": []}),
        "non-empty assistant response": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": " "}]}),
        "needs 'role' and 'content'": json.dumps({"messages": [{"content": "hi"}]}),
    }
    for needle, bad in cases.items():
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(UserError) as exc:
            load_chat_jsonl(f)
        assert f"{f} row 3" in str(exc.value) and needle in str(exc.value)


def test_labels_cover_assistant_turns_only():
    _, tok = build_tiny_model()
    conv = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]
    ids, labels = encode_chat(tok, conv, 512)
    supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert supervised == "2<|im_end|>\n"


def test_own_loop_lowers_both_losses():
    model, tok = build_tiny_model(free_rows=4, seed=0)
    convs = []
    for line in tiny_corpus(40, seed=1):
        if line.startswith("What"):
            q, a = line.split("? ")
            convs.append([{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a}])
    cfg = IDLMConfig(mask_token_id=len(tok), stride=3)
    log = train_loop(model, tok, convs, cfg, LoopTrainConfig(steps=30, batch_size=8, grad_accum=2, lr=3e-3))
    assert log[-1]["ce_noisy"] < log[0]["ce_noisy"] - 1.0
    assert log[-1]["ce_clean"] < log[0]["ce_clean"] - 1.0
