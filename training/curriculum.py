"""The stride curriculum's bookkeeping, shared by every trainer (the LlamaFactory worker and the own loop).

A plan's stages run in order; each writes its result into its own directory and, last, the stage marker
``idlm_stage.json``. A stage whose directory holds the marker is finished: `idlm train` skips it on a rerun, and the
next stage starts from its weights (a gated-LoRA adapter stage starts from the base model instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGE_DONE_FILE = "idlm_stage.json"


def stage_dir_name(index: int, stride: int, adapter_section: bool = False) -> str:
    """Directory of stage ``index`` (1-based) inside the run's output directory; the pipeline's ``adapter`` stage
    (after the curriculum) is ``adapter{i}-n{N}``, every other stage ``stage{i}-n{N}``."""
    return f"adapter{index}-n{stride}" if adapter_section else f"stage{index}-n{stride}"


def is_stage_done(output_dir: str | Path) -> bool:
    return (Path(output_dir) / STAGE_DONE_FILE).is_file()


def mark_stage_done(output_dir: str | Path, info: dict[str, Any]) -> None:
    """Write the stage marker atomically (a kill leaves either no marker or a complete one)."""
    out = Path(output_dir)
    tmp = out / f".{STAGE_DONE_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    tmp.replace(out / STAGE_DONE_FILE)


def read_stage_marker(output_dir: str | Path) -> dict[str, Any] | None:
    p = Path(output_dir) / STAGE_DONE_FILE
    return json.loads(p.read_text()) if p.is_file() else None
