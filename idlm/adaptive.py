"""Load-adaptive stride: the N of each decode step, from live acceptance and the measured step-cost curve.

A decode step at stride N runs R = 2N - 1 rows per request. Its tokens per forward follow from the per-position
acceptance a_1..a_{N-1} (draft k accepted given drafts 1..k-1 were) and ISD's cold starts: a step with drafts
("warm") emits 1 + a_1 + a_1 a_2 + ... + a_1...a_{N-1} tokens on average and stays warm only when every draft was
accepted (probability A = a_1...a_{N-1}); after a rejection the next step has no drafts and emits one token. The
two-state chain's tokens per forward is therefore (E_warm + 1 - A) / (2 - A) (1 at N = 1: plain AR).

The policy picks the N that maximises tokens per second of the whole batch, TPF(N) / cost(B, 2N - 1), where cost is
a measured table of decode-forward seconds by batch size and rows per request. N = 1 is always a candidate, so when
the measured costs hold, a step is never expected to be slower than AR. Which N runs changes only how many tokens a
forward yields, never their distribution: every ISD step is exact whatever its stride (`idlm.isd`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def tokens_per_forward(acceptance: Sequence[float], stride: int) -> float:
    """Expected tokens per decode forward at ``stride`` N (steady state, cold starts included), from the acceptance
    per draft position 1..N-1 (``acceptance[k - 1]``; positions beyond it count as never accepted)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    warm, run = 1.0, 1.0
    for k in range(stride - 1):
        run *= acceptance[k] if k < len(acceptance) else 0.0
        warm += run
    return (warm + 1.0 - run) / (2.0 - run)


@dataclass(frozen=True)
class StepCostTable:
    """Measured seconds of one decode forward: ``seconds[i][j]`` at ``batch_sizes[i]`` requests (ascending) and
    ``rows[j]`` rows per request. Between measured batch sizes the cost is interpolated linearly; past the largest
    it grows in proportion to the batch; below the smallest it is the smallest's."""

    batch_sizes: tuple[int, ...]
    rows: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)):
            raise ValueError(f"batch_sizes must be ascending and distinct, got {self.batch_sizes}")
        if len(self.seconds) != len(self.batch_sizes) or any(len(r) != len(self.rows) for r in self.seconds):
            raise ValueError("seconds must have one row per batch size and one column per row count")
        if any(not (s > 0 and math.isfinite(s)) for r in self.seconds for s in r):
            raise ValueError("step costs must be positive and finite")

    def __call__(self, batch: int, rows: int) -> float:
        if rows not in self.rows:
            raise KeyError(f"no measured cost for {rows} rows per request (measured: {list(self.rows)})")
        j = self.rows.index(rows)
        sizes = self.batch_sizes
        if batch <= sizes[0]:
            return self.seconds[0][j]
        if batch >= sizes[-1]:
            return self.seconds[-1][j] * batch / sizes[-1]
        i = bisect.bisect_left(sizes, batch)
        if sizes[i] == batch:
            return self.seconds[i][j]
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return (1 - w) * self.seconds[i - 1][j] + w * self.seconds[i][j]

    def to_json(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "rows": list(self.rows),
                "seconds": [list(r) for r in self.seconds]}

    @classmethod
    def from_json(cls, data: dict) -> StepCostTable:
        return cls(tuple(int(b) for b in data["batch_sizes"]), tuple(int(r) for r in data["rows"]),
                   tuple(tuple(float(s) for s in row) for row in data["seconds"]))


def stride_rates(acceptance: Sequence[float], cost: Callable[[int, int], float], batch: int,
                 max_stride: int) -> dict[int, float]:
    """Expected tokens per second of a ``batch``-request step at each N in 1..max_stride. cost(batch, rows):
    seconds of a step with ``rows`` rows per request (a `StepCostTable`)."""
    return {n: tokens_per_forward(acceptance, n) / cost(batch, 2 * n - 1) for n in range(1, max_stride + 1)}


def best_of(rates: dict[int, float]) -> int:
    """The N of the highest rate; ties (within float rounding) go to the smaller N."""
    best = min(rates)
    for n in sorted(rates):
        if rates[n] > rates[best] * (1 + 1e-9):
            best = n
    return best


def best_stride(acceptance: Sequence[float], cost: Callable[[int, int], float], batch: int, max_stride: int) -> int:
    """The N in 1..max_stride with the most expected tokens per second for a batch of ``batch`` requests (ties go
    to the smaller N)."""
    return best_of(stride_rates(acceptance, cost, batch, max_stride))


@dataclass
class AdaptiveStride:
    """The stride policy of a serving engine: live per-position acceptance, N chosen per decode step.

    max_stride: the largest N (the model's trained stride). cost: the measured step costs (`StepCostTable`, with
    rows 2N - 1 for every N in 1..max_stride). memory: steps over which acceptance counts fade (each step scales the
    old counts by 1 - 1 / memory), so the estimate follows the workload. prior: the acceptance assumed before a
    position has been seen, worth ``prior_weight`` attempts. explore_every: every that many steps run the second
    best N once, so that the estimates of an N not chosen lately (its acceptance, its measured cost) keep up with
    the workload (0: never).
    """

    max_stride: int
    cost: StepCostTable
    memory: float = 200.0
    prior: float = 0.5
    prior_weight: float = 4.0
    attempted: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    chosen: dict[int, int] = field(default_factory=dict)  # steps run at each N
    cost_scale: dict[int, float] = field(default_factory=dict)  # N -> measured step seconds / the table's
    explore_every: int = 100
    steps: int = 0

    def __post_init__(self) -> None:
        if self.max_stride < 1:
            raise ValueError(f"max_stride must be >= 1, got {self.max_stride}")
        missing = [2 * n - 1 for n in range(1, self.max_stride + 1) if 2 * n - 1 not in self.cost.rows]
        if missing:
            raise ValueError(f"the step-cost table lacks rows {missing} (2N - 1 for N = 1..{self.max_stride})")
        if not self.attempted:
            self.attempted = [self.prior_weight] * (self.max_stride - 1)
            self.accepted = [self.prior * self.prior_weight] * (self.max_stride - 1)

    @property
    def acceptance(self) -> list[float]:
        return [a / t for a, t in zip(self.accepted, self.attempted)]

    def observe(self, attempted: Sequence[int], accepted: Sequence[int]) -> None:
        """One decode step's counts per draft position, for the positions its stride had (``len(attempted)``).
        Those positions' older counts fade by 1 - 1 / memory; deeper ones keep their last estimate."""
        keep = 1.0 - 1.0 / self.memory
        for k in range(min(len(attempted), self.max_stride - 1)):
            self.attempted[k] = self.attempted[k] * keep + attempted[k]
            self.accepted[k] = self.accepted[k] * keep + accepted[k]

    def observe_cost(self, batch: int, stride: int, seconds: float) -> None:
        """A whole decode step's wall time at ``stride`` for ``batch`` requests. What the table does not hold (the
        step's own work around the forward, a machine slower than at start-up) moves that N's cost scale, an
        exponential average of measured / tabled seconds over about 20 steps (fewer when ``memory`` is smaller).
        Strides that stop being chosen keep their last scale."""
        ratio = seconds / self.cost(batch, 2 * stride - 1)
        old = self.cost_scale.get(stride)
        self.cost_scale[stride] = ratio if old is None else old + (ratio - old) / min(self.memory, 20.0)

    def step_cost(self, batch: int, rows: int) -> float:
        """The expected seconds of a step: the table's, times what the steps of that N measured so far."""
        return self.cost(batch, rows) * self.cost_scale.get((rows + 1) // 2, 1.0)

    def choose(self, batch: int) -> int:
        rates = stride_rates(self.acceptance, self.step_cost, batch, self.max_stride)
        n = best_of(rates)
        self.steps += 1
        if self.explore_every and self.steps % self.explore_every == 0 and self.max_stride > 1:
            del rates[n]
            n = best_of(rates)  # the runner-up
        self.chosen[n] = self.chosen.get(n, 0) + 1
        return n
