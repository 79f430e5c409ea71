"""Peak GPU memory of building the objective's flex BlockMask, against a dense bool mask of the same size."""
import sys
import time

import torch

from idlm.masks import flex_block_mask
from idlm.objective import build_inputs

L = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
valid = torch.ones(1, L, dtype=torch.long, device="cuda")
ids = torch.zeros(1, L, dtype=torch.long, device="cuda")
labels = ids.clone()
labels[:, :512] = -100
inputs = build_inputs(ids, labels, 1, 3, valid)
for attempt in range(2):  # the first call warms up allocations
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.time()
    bm = flex_block_mask(inputs.layout, inputs.noisy_index)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    n = inputs.num_noisy_rows + L
    print(f"attempt {attempt}: rows {n}, peak {peak / 2**20:.1f} MiB, dense bool would be {n * n / 2**20:.1f} MiB, "
          f"{time.time() - t:.2f} s", flush=True)
