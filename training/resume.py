"""Resuming a stage: which checkpoint-N of a stage directory is committed, and the training log cut back to it
(shared by the launcher and the trainers, kept free of heavy imports)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

COMMIT_FILE = "idlm_commit.json"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def committed_checkpoint(stage_dir: str, clean: bool = False) -> str | None:
    """The newest checkpoint-N of ``stage_dir`` that holds a commit marker; with ``clean``, delete newer
    uncommitted ones (left by a kill during a save)."""
    d = Path(stage_dir)
    if not d.is_dir():
        return None
    ckpts = sorted(((int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()),
                   reverse=True)
    best = None
    for _, p in ckpts:
        if (p / COMMIT_FILE).is_file():
            best = p
            break
        if clean:
            shutil.rmtree(p, ignore_errors=True)
    return str(best) if best else None


def truncate_log(path: str, stage: int, after_step: int) -> None:
    """Drop the rows of ``stage`` logged after ``after_step`` (a resumed stage logs those steps again)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("stage") == stage and int(row.get("step", 0)) > after_step:
            continue
        keep.append(line)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(p)
