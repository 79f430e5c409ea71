"""The one tweak of a dependency's internals in the training code (no forks: a small patch, pinned, in one file),
for CPU runs only.

DeepSpeed 0.19.8's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (``deepspeed_shm_comm``) the first
time a process group starts: about 85 s of C++ compilation on a 2-core machine, once per machine. Our CPU runs
(tests, the tiny recipe) do not need it: gloo all-reduces the same tensors. DeepSpeed decides whether to build it
from the module-level ``deepspeed.ops.__compatible_ops__`` dictionary (computed on first access and kept, so that
edits to it persist, as its comment says); marking the op incompatible makes DeepSpeed fall back to
torch.distributed (gloo). GPU runs are untouched (the CUDA accelerator has no such op). ``IDLM_DS_SHM=1`` keeps the
kernel. `tests/test_train_launch.py::test_deepspeed_patch_matches_pinned_version` fails when DeepSpeed moves.
"""

from __future__ import annotations

import os

PINNED_DEEPSPEED = "0.19.8"
SHM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_build() -> bool:
    """On DeepSpeed's CPU accelerator, stop the JIT build of the shm comm op; True when it was switched off."""
    if os.environ.get("IDLM_DS_SHM", "0") == "1":
        return False
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return False
    if get_accelerator().device_name() != "cpu":
        return False
    ops = deepspeed.ops.__compatible_ops__
    if SHM_OP not in ops:
        return False
    ops[SHM_OP] = False
    return True
