"""The `idlm` block stored in an I-DLM checkpoint's config.json.

An I-DLM checkpoint is a plain HF causal-LM checkpoint; everything I-DLM specific lives in one
dictionary under the key ``idlm`` of its config, so stock ``AutoModelForCausalLM`` loads it unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from idlm.errors import UserError

IDLM_CONFIG_KEY = "idlm"
FORMAT_VERSION = 1


@dataclass
class ObjectiveConfig:
    """Settings of the all-masked [x_t | x_0] training objective.

    alpha: weight of the clean (AR) cross-entropy; with ``auto_balance`` it multiplies the balanced weight.
    auto_balance: weight the clean term by CE_noisy / CE_clean (detached), times ``alpha``.
    block_align: where mask blocks start: ``"response"`` restarts blocks at every supervised segment,
        ``"sequence"`` aligns them to position 0 as the paper's code does.
    distill_kl: weight of KL(teacher || model) on the clean half, the teacher being the frozen model before
        conversion: it keeps the AR distribution where the base had it (0 at initialisation). 0 = off.
    distill_soft: share of soft targets in the noisy half, in [0, 1]: the MASK rows are trained towards the
        teacher's next-token distribution p instead of the data token (what ISD's min(1, p/q) rewards). 0 = off.
    distill_accept: weight of the acceptance gap 1 - sum_x min(p(x), q(x)) on the noisy half, p the teacher's
        distribution at the data's next token: the miss rate of a draft sampled from q, whose average over the
        data's own next tokens is what the best sampled drafter minimises (`idlm.ceiling`). 0 = off.
    """

    alpha: float = 0.2
    auto_balance: bool = False
    block_align: Literal["response", "sequence"] = "response"
    distill_kl: float = 0.0
    distill_soft: float = 0.0
    distill_accept: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise UserError(f"objective alpha must be >= 0, got {self.alpha}")
        if self.block_align not in ("response", "sequence"):
            raise UserError(f"objective block_align must be 'response' or 'sequence', got {self.block_align!r}")
        if not self.distill_kl >= 0:  # also rejects NaN
            raise UserError(f"objective distill_kl must be >= 0, got {self.distill_kl}")
        if not 0 <= self.distill_soft <= 1:
            raise UserError(f"objective distill_soft must be in [0, 1], got {self.distill_soft}")
        if not self.distill_accept >= 0:
            raise UserError(f"objective distill_accept must be >= 0, got {self.distill_accept}")
        if self.auto_balance and self.distill_kl > 0:
            raise UserError("objective auto_balance and distill_kl cannot be combined: the KL term already anchors "
                            "the clean half; use a fixed alpha")

    @property
    def uses_teacher(self) -> bool:
        """Whether the objective needs the frozen teacher's logits."""
        return self.distill_kl > 0 or self.distill_soft > 0 or self.distill_accept > 0


@dataclass
class IDLMConfig:
    """What makes a causal LM an I-DLM.

    mask_token_id: the input id of the MASK token (an embedding row of the model).
    stride: N, tokens per ISD step; training uses blocks of N - 1 mask positions.
    """

    mask_token_id: int
    stride: int = 2
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.objective, dict):
            self.objective = ObjectiveConfig(**self.objective)
        check_stride(self.stride)
        if self.mask_token_id < 0:
            raise UserError(f"mask token id must be >= 0, got {self.mask_token_id}")

    @property
    def block_size(self) -> int:
        """Mask positions per training block (N - 1)."""
        return self.stride - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IDLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown keys in the idlm config block: {sorted(unknown)}")
        return cls(**data)


# Largest stride N: a step reads 2N - 1 rows per request and every checkpoint's mask blocks are N - 1 wide; far
# beyond the paper's N <= 8 and small enough that a typo (1000000000) fails here, not in every request.
MAX_STRIDE = 64


def check_stride(stride: int) -> None:
    if not isinstance(stride, int) or isinstance(stride, bool) or not 2 <= stride <= MAX_STRIDE:
        raise UserError(f"stride must be an integer >= 2 and <= {MAX_STRIDE} (N tokens per step), got {stride!r}")


def decode_stride_problem(stride: object) -> str | None:
    """Why ``stride`` cannot be decoded with (None if it can): decoding also takes N = 1, plain AR through the same
    code, up to MAX_STRIDE. The one rule of the engine, `idlm generate` and `idlm serve`."""
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= MAX_STRIDE:
        return f"stride must be an integer in [1, {MAX_STRIDE}] (1 = plain AR decoding), got {stride!r}"
    return None


def step_rows(stride: int) -> int:
    """Rows per request of one ISD forward at stride N: [pending, N - 1 drafts, N - 1 MASK] = 2N - 1."""
    check_stride(stride)
    return 2 * stride - 1


def read_idlm_config(hf_config: Any) -> IDLMConfig | None:
    """The `idlm` block of a transformers config (object or dict), or None for a plain AR model."""
    block = hf_config.get(IDLM_CONFIG_KEY) if isinstance(hf_config, dict) else getattr(hf_config, IDLM_CONFIG_KEY, None)
    if block is None:
        return None
    return IDLMConfig.from_dict(dict(block))


def write_idlm_config(hf_config: Any, cfg: IDLMConfig) -> None:
    """Store ``cfg`` in a transformers config object; it is serialised into config.json by save_pretrained."""
    setattr(hf_config, IDLM_CONFIG_KEY, cfg.to_dict())
