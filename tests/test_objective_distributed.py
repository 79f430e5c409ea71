"""Normalisation across data-parallel ranks: two gloo ranks reproduce the one-process global-batch gradient, with
the CE objective and with a distillation teacher."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from idlm.config import IDLMConfig, ObjectiveConfig
from idlm.objective import Teacher, global_target_counts, idlm_loss
from tests.helpers import random_batch, tiny_model

VOCAB = 48
ROWS = [(3, 8, 0), (2, 3, 6), (5, 6, 0), (1, 9, 1), (4, 2, 5), (2, 7, 2)]
CFGS = {"ce": IDLMConfig(mask_token_id=VOCAB - 1, stride=3),
        "distill": IDLMConfig(mask_token_id=VOCAB - 1, stride=3,
                              objective=ObjectiveConfig(distill_kl=1.0, distill_soft=1.0))}


def _teacher(kind: str) -> Teacher | None:
    return Teacher(tiny_model("qwen3", VOCAB, seed=9)) if kind == "distill" else None


def _rank_micro_batches(rank: int):
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=11)
    mine = [i for i in range(len(ROWS)) if i % 2 == rank]  # uneven token counts per rank
    return [(ids[[i]], labels[[i]], mask[[i]]) for i in mine]


def _worker(rank: int, world: int, port: int, out_dir: str, kind: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("qwen3", VOCAB)
        teacher = _teacher(kind)
        micro = _rank_micro_batches(rank)
        n_noisy, n_clean = global_target_counts([lab for _, lab, _ in micro])
        for ids, labels, mask in micro:  # gradient accumulation on this rank
            idlm_loss(model, ids, labels, CFGS[kind], mask, num_noisy=n_noisy, num_clean=n_clean,
                      teacher=teacher).loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(grads)  # sum over ranks
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ce", "distill"])
def test_two_ranks_match_one_global_batch(tmp_path, kind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), kind), nprocs=2, join=True)
    ids, labels, mask = random_batch(ROWS, VOCAB, seed=11)
    model = tiny_model("qwen3", VOCAB)
    idlm_loss(model, ids, labels, CFGS[kind], mask, teacher=_teacher(kind)).loss.backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.load(tmp_path / "grads.pt"), ref, rtol=1e-9, atol=1e-12)
