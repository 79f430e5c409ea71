"""Training recipes, data checks, launch commands, checkpoint bookkeeping and the FLOP count (no LlamaFactory
needed: these run before any training process starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlm.cli import main as cli_main
from idlm.errors import UserError
from idlm.training.datacheck import check_dataset_dir, prepare_train_file, read_pretokenized
from idlm.training.launch import stage_command, worker_env
from idlm.training.recipe import PLAN_FILE, Plan, resolve_recipe
from idlm.training.resume import COMMIT_FILE, committed_checkpoint, truncate_log
from tests.helpers import write_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/train/tiny_cpu.yaml"
Q8B = REPO / "configs/train/qwen3_8b_idlm.yaml"
GOOD = {"messages": [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}]}




def test_tiny_recipe_resolves_into_two_stages(fake_idlm_model, tmp_path):
    plan = resolve_recipe(TINY, [f"model_name_or_path={fake_idlm_model}", f"output_dir={tmp_path / 'run'}",
                                 "stages.1.learning_rate=1e-4"])
    s1, s2 = plan.stages
    assert [s.settings.stride for s in plan.stages] == [2, 3]
    assert s1.settings.output_dir.endswith("stage1-n2") and s2.settings.output_dir.endswith("stage2-n3")
    assert s1.lf_args["model_name_or_path"] == fake_idlm_model
    assert s2.lf_args["model_name_or_path"] == s1.settings.output_dir  # each stage starts from the previous one
    assert s2.settings.auto_balance and s2.settings.alpha == 1.0 and not s1.settings.auto_balance
    assert s2.lf_args["learning_rate"] == 1e-4 and isinstance(s2.lf_args["learning_rate"], float)
    assert s1.lf_args["learning_rate"] == 3e-3
    assert Path(s1.lf_args["deepspeed"]).is_file() and s1.lf_args["deepspeed"].endswith("configs/deepspeed/zero2.json")
    assert s1.lf_args["stage"] == "sft" and s1.lf_args["finetuning_type"] == "full"
    for st in plan.stages:  # no I-DLM key reaches LlamaFactory's parser
        assert not {"stride", "alpha", "auto_balance", "stages", "nproc_per_node"} & set(st.lf_args)
    assert plan.launch.nproc_per_node == 2 and plan.launch.launcher == "torchrun"
    assert Plan.from_json(plan.to_json()) == plan


def test_paper_recipe(fake_idlm_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    plan = resolve_recipe(Q8B, [f"model_name_or_path={fake_idlm_model}", f"output_dir={tmp_path}"])
    assert [s.settings.stride for s in plan.stages] == [2, 3, 4]
    last = plan.stages[-1].settings
    assert last.auto_balance and last.alpha == 1.0
    assert not any(s.settings.auto_balance for s in plan.stages[:-1])
    lf = plan.stages[0].lf_args
    assert lf["bf16"] is True and lf["cutoff_len"] == 4096 and lf["learning_rate"] == 1e-5
    assert lf["lr_scheduler_type"] == "cosine" and lf["warmup_ratio"] == 0.03
    assert lf["per_device_train_batch_size"] == 1 and lf["gradient_accumulation_steps"] == 4
    assert plan.stages[0].settings.attn_implementation == "flex_attention"
    assert plan.launch.nproc_per_node == 8


@pytest.mark.parametrize(("change", "needle"), [
    ({"stages": [{}]}, "set 'stride'"),
    ({"finetuning": "qlora"}, "finetuning must be"),
    ({"stages": [{"stride": 2}, {"stride": 3, "model_name_or_path": "x"}]}, "previous stage's weights"),
    ({"finetuning": "gated_lora", "alpha": 0.0}, "one stage"),
    ({"dataset": None}, "exactly one of"),
    ({"train_file": "missing.jsonl"}, "exactly one of"),
    ({"output_dir": None}, "'output_dir' is required"),
    ({"block_align": "middle"}, "block_align"),
    ({"deepspeed": "nowhere.json"}, "DeepSpeed config not found"),
    ({"stage": "pt"}, "set by idlm train"),
    ({"neat_packing": True}, "not supported"),
    ({"compile_layers": "yes"}, "compile_layers must be true or false"),
    ({"compile_layers": True, "finetuning": "gated_lora", "alpha": 0.0,
      "stages": [{"stride": 3}]}, "full only"),
    ({"distill_accept": -1}, "distill_accept must be >= 0"),
    ({"distill_accept": "lots"}, "distill_accept must be numbers"),
    ({"finetuning": "gated_lora", "alpha": 0.0, "distill_accept": 1.0,
      "stages": [{"stride": 3}]}, "distillation is not supported"),
])
def test_recipe_errors(tmp_path, fake_idlm_model, change, needle):
    import yaml

    body = yaml.safe_load(TINY.read_text())
    body.update(model_name_or_path=fake_idlm_model, output_dir=str(tmp_path / "o"))
    for k, v in change.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    with pytest.raises(UserError, match=needle):
        resolve_recipe(write_recipe(tmp_path, body))


def _run_cli(args, capsys):
    rc = cli_main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize(("bad", "needle"), [
    ("{oops", "not JSON"),
    (json.dumps({"conversations": []}), "missing field 'messages'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
     "empty response"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "must end with an 'assistant' response"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), "needs 'role' and"),
])
def test_malformed_train_file_row_stops_with_file_and_row(tmp_path, fake_idlm_model, capsys, bad, needle):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")
    recipe = write_recipe(tmp_path, {"model_name_or_path": fake_idlm_model, "train_file": str(data), "stride": 2,
                                "output_dir": str(tmp_path / "out")})
    rc, err = _run_cli([recipe], capsys)
    assert rc == 2 and len(err) == 1
    assert f"{data} row 3" in err[0] and needle in err[0], err
    assert not (tmp_path / "out" / PLAN_FILE).exists()  # nothing started


@pytest.mark.parametrize("formatting", ["sharegpt", "alpaca"])
def test_malformed_dataset_dir_row(tmp_path, fake_idlm_model, capsys, formatting):
    d = tmp_path / "data"
    d.mkdir()
    if formatting == "alpaca":
        rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}]
        info = {"mine": {"file_name": "d.json", "formatting": "alpaca"}}
        (d / "d.json").write_text(json.dumps(rows))  # a JSON array: rows are counted from 1
        where, needle = f"{d / 'd.json'} row 2", "missing field 'output'"
    else:
        rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                {"conversations": [{"from": "gpt", "value": "a"}]}]
        info = {"mine": {"file_name": "d.jsonl", "formatting": "sharegpt"}}
        (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        where, needle = f"{d / 'd.jsonl'} row 2", "turn 0 has role 'gpt'"
    (d / "dataset_info.json").write_text(json.dumps(info))
    recipe = write_recipe(tmp_path, {"model_name_or_path": fake_idlm_model, "dataset": "mine", "dataset_dir": str(d),
                                "stride": 2, "output_dir": str(tmp_path / "out")})
    rc, err = _run_cli([recipe], capsys)
    assert rc == 2 and len(err) == 1 and where in err[0] and needle in err[0], err
    rows[-1] = rows[0]
    if formatting == "alpaca":
        (d / "d.json").write_text(json.dumps(rows))
    else:
        (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert check_dataset_dir(str(d), ["mine"]) == 2


def test_base_model_must_be_converted(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    rc, err = _run_cli([str(TINY), f"model_name_or_path={plain}", f"output_dir={tmp_path / 'o'}"], capsys)
    assert rc == 2 and len(err) == 1 and "idlm convert" in err[0]


def test_train_file_formats(tmp_path):
    for row, fmt in [(GOOD, "sharegpt"), ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
                     ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt")]:
        f = tmp_path / f"{fmt}.jsonl"
        f.write_text(json.dumps(row) + "\n")
        prepare_train_file(str(f), str(tmp_path / "info"), "x")
        entry = json.loads((tmp_path / "info" / "dataset_info.json").read_text())["x"]
        assert entry["formatting"] == fmt and entry["file_name"] == str(f.resolve())


def test_pretokenized_rows(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}) + "\n")
    cols = read_pretokenized(f, cutoff_len=3)
    assert cols["input_ids"] == [[1, 2, 3]] and cols["labels"] == [[-100, -100, 3]]
    for bad, needle in [({"input_ids": [1, 2], "labels": [1]}, "differ in length"),
                        ({"input_ids": [1, 2]}, "missing field 'labels'"),
                        ({"input_ids": [1, 2], "labels": [-100, -100]}, "no supervised token")]:
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=f"row 1: .*{needle}"):
            read_pretokenized(f, cutoff_len=8)


def test_launch_commands_and_env(tmp_path, fake_idlm_model, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in to wandb
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    plan = resolve_recipe(TINY, [f"model_name_or_path={fake_idlm_model}", f"output_dir={tmp_path}",
                                 "report_to=[wandb, tensorboard]"])
    cmd = stage_command(plan, "/p.json", plan.stages[1], "/ck")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    i = cmd.index("-m", 3)
    assert cmd[i + 1:] == ["idlm.training.worker", "/p.json", "--stage", "2", "--resume", "/ck"]
    assert cmd[cmd.index("--node_rank") + 1] == "1" and cmd[cmd.index("--master_addr") + 1] == "10.1.2.3"
    assert cmd[cmd.index("--master_port") + 1] == "29500"  # nodes must agree on a port
    env = worker_env(plan)
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == plan.output_dir
    monkeypatch.setenv("LAUNCHER", "deepspeed")
    monkeypatch.setenv("NNODES", "1")
    monkeypatch.setenv("NODE_RANK", "0")
    plan = resolve_recipe(TINY, [f"model_name_or_path={fake_idlm_model}", f"output_dir={tmp_path}"])
    cmd = stage_command(plan, "/p.json", plan.stages[0], None)
    assert "deepspeed.launcher.runner" in cmd and cmd[cmd.index("--module") + 1] == "idlm.training.worker"
    plan = resolve_recipe(TINY, [f"model_name_or_path={fake_idlm_model}", f"output_dir={tmp_path}",
                                 "deepspeed=null", "nproc_per_node=1"])
    assert stage_command(plan, "/p.json", plan.stages[0], None)[1:3] == ["-m", "idlm.training.worker"]


def test_committed_checkpoint_and_log_truncation(tmp_path):
    for step, committed in [(2, True), (4, True), (6, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if committed:
            (d / COMMIT_FILE).write_text("{}")
    assert committed_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-6").exists()
    assert committed_checkpoint(str(tmp_path), clean=True) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()  # a half-written checkpoint is removed
    log = tmp_path / "log.jsonl"
    rows = [{"stage": 1, "step": s} for s in (1, 2)] + [{"stage": 2, "step": s} for s in (1, 2, 3, 4, 5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_log(str(log), 2, 4)
    assert [(r["stage"], r["step"]) for r in map(json.loads, log.read_text().splitlines())] == \
        [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]


def test_collator_pads_and_keeps_labels():
    from idlm.training.trainer import IDLMCollator

    batch = IDLMCollator(pad_token_id=0, pad_to_multiple_of=8)([
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "images": None},
        {"input_ids": [9] * 10, "attention_mask": [1] * 10, "labels": [9] * 10},
    ])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"][0].tolist()[:4] == [-100, 6, 7, -100] and batch["attention_mask"][0].sum() == 3


@pytest.mark.parametrize("align", ["response", "sequence"])
def test_attention_pairs_match_the_dense_mask(align):
    """The FLOP count's attention term equals the number of allowed (query, key) pairs of the real rows."""
    from idlm.config import IDLMConfig, ObjectiveConfig
    from idlm.masks import dense_mask
    from idlm.objective import build_inputs
    from idlm.training.flops import ar_work, objective_work
    from tests.helpers import random_batch

    ids, labels, mask = random_batch([(3, 8, 0), (2, 5, 4), (6, 3, 2)], 50, seed=3)
    cfg = IDLMConfig(mask_token_id=49, stride=4, objective=ObjectiveConfig(block_align=align))
    inputs = build_inputs(ids, labels, 49, 3, mask, align)
    dense = dense_mask(inputs.layout, inputs.noisy_index)[:, 0]
    K = inputs.num_noisy_rows
    src = inputs.noisy_index.clamp(min=0)
    row_valid = torch.cat([(inputs.noisy_index >= 0) & mask.bool().gather(1, src), mask.bool()], dim=1)
    work = objective_work(ids, labels, mask, cfg)
    assert work.attn_pairs == int(dense[row_valid].sum())
    assert work.model_tokens == int(row_valid.sum()) and work.tokens == int(mask.sum())
    assert work.model_tokens > work.tokens and K > 0
    ar = ar_work(ids, mask)
    assert ar.attn_pairs == int(dense[:, K:, K:][mask.bool()].sum())  # the clean half is the AR model


def test_missing_training_extra_is_one_line(tmp_path, fake_idlm_model, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llamafactory" else real(name, *a))
    rc, err = _run_cli([str(TINY), f"model_name_or_path={fake_idlm_model}", f"output_dir={tmp_path / 'o'}"], capsys)
    assert rc == 2 and len(err) == 1 and "idlm[train]" in err[0]
