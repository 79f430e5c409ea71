"""Answer extraction from model responses: thinking, multiple-choice letters, \\boxed{} answers, code blocks.

The paper's scripts read ``message.content`` of a Qwen3 thinking-mode response (``<think>...</think>answer``)
and strip the thinking themselves, some up to the FIRST ``</think>`` (multiple choice, AIME, MathBench), some up
to the LAST (MATH-500, IFEval, HumanEval, MBPP); see the paper's evaluation scripts, thuEcstasy/I-DLM. Both are here.
"""

from __future__ import annotations

import ast
import re
import textwrap

THINK_END = "</think>"
MC_TAIL_CHARS = 500  # the anchor's multiple-choice scripts read only this tail of an unfinished (no </think>) answer


# ---------------------------------------------------------------------------------------------- thinking
def strip_thinking_first(text: str | None) -> str:
    """Everything after the FIRST ``</think>`` (and following whitespace); the text itself when there is none."""
    if not text:
        return ""
    i = text.find(THINK_END)
    return text if i < 0 else text[i + len(THINK_END):].lstrip()


def strip_thinking_last(text: str | None) -> str:
    """Everything after the LAST ``</think>`` (and following whitespace); the text itself when there is none."""
    if not text:
        return ""
    i = text.rfind(THINK_END)
    return text if i < 0 else text[i + len(THINK_END):].lstrip()


def mc_answer_region(text: str | None) -> str:
    """The part the multiple-choice extractors read: after the first ``</think>``, else the last 500 characters."""
    if not text:
        return ""
    if THINK_END in text:
        return strip_thinking_first(text)
    return text[-MC_TAIL_CHARS:]


# ---------------------------------------------------------------------------------------------- \boxed{}
def boxed_spans(text: str) -> list[tuple[int, str]]:
    """(position, content) of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces) and ``\\boxed 5``, in
    text order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end():i - 1]))
    out += [(m.start(), m.group(1)) for m in re.finditer(r"\\boxed\s+([^\s{$]+)", text)]  # "\boxed 5" occurs too
    return sorted(out)


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), in text order."""
    return [c for _, c in boxed_spans(text)]


def last_boxed(text: str, skip_empty: bool = False) -> str | None:
    """The last ``\\boxed{}`` content by position in the text; with ``skip_empty`` the last one that is not blank
    (a thinking model repeats the instruction "within \\boxed{}" with an empty box)."""
    spans = [c for _, c in boxed_spans(text) if not skip_empty or c.strip()]
    return spans[-1] if spans else None


# ---------------------------------------------------------------------------------------------- multiple choice
def _letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOP"[:n]


def _clean_box(content: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|textit)\s*\{([^{}]*)\}", r"\1", content)
    return s.replace("$", "").strip()


def extract_choice(text: str | None, n_options: int = 4, style: str = "answer_is") -> str | None:
    """The chosen option letter, or None.

    ``style`` picks the first pattern, as the benchmark's prompt asks for it: ``answer_is`` ("The answer is (X)",
    ARC/MMLU/MMLU-Pro), ``answer_colon`` ("ANSWER: X", GPQA; also ``ANSWER: $X$``, the prompt's literal
    ``$LETTER``), ``option`` ("the correct answer is option X", MathBench). Then, in order: other "answer is/answer:"
    forms, ``\\boxed{X}``, a trailing ``**X**`` / ``(X)``, a last line "X." / "X)", a final "Answer: X".

    Within a pattern the LAST occurrence wins: a model that corrects itself ("the answer is (A). Wait... the answer
    is (C)") or writes two ``ANSWER:`` lines means the final one (the anchor's ``re.search`` took the first).
    Unlike the anchor's regexes, a letter must stand alone (upper case, or lower case inside parentheses), so
    "the answer is a bit unclear" or ``\\boxed{\\text{B}}`` cannot be read as A or E.
    """
    region = mc_answer_region(text)
    if not region:
        return None
    L = _letters(n_options)
    cls = f"[{L}]"
    letter = rf"(?:\(({cls}|[{L.lower()}])\)|({cls}))(?![A-Za-z0-9])"  # (X) | (x) | X, standing alone
    wrap = r"(?:\*\*|\$|\\(?:text|textbf|mathrm|mathbf)\s*\{|\s)*"  # bold, $..$, \text{..} around the letter

    def pick(m: re.Match | None) -> str | None:
        if not m:
            return None
        g = next((x for x in m.groups() if x), None)
        return g.upper() if g else None

    patterns: list[str] = []
    if style == "answer_colon":
        patterns.append(rf"ANSWER\s*:{wrap}{letter}")
    if style == "option":
        patterns.append(rf"(?i:correct\s+answer\s+is)\s*:?{wrap}(?i:option)?{wrap}{letter}")
    patterns += [
        rf"(?i:answer\s+is)\s*:?{wrap}(?i:option\s+)?{wrap}{letter}",
        rf"(?i:answer){wrap}:{wrap}(?i:option\s+)?{letter}",
    ]
    for p in patterns:
        for m in reversed(list(re.finditer(p, region))):
            got = pick(m)
            if got:
                return got
    for content in reversed(boxed_contents(region)):
        c = _clean_box(content)
        m = re.fullmatch(rf"\(?({cls})\)?(?:[.):]\s*.*)?", c, flags=re.S)
        if m:
            return m.group(1)
    tail = region.strip()
    m = re.search(rf"(?:\*\*\(?({cls})\)?\*\*|\(({cls})\))\s*[.\s]*$", tail)
    if m:
        return (m.group(1) or m.group(2)).upper()
    lines = re.findall(rf"(?m)^\s*\(?({cls})[.)]\s*$", region)
    if lines:
        return lines[-1]
    m = re.search(rf"^\s*\*{{0,2}}({cls})\*{{0,2}}\s*\.?\s*$", tail)
    if m:
        return m.group(1)
    return None


# ---------------------------------------------------------------------------------------------- code blocks
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+\-]*)[^\n]*\n(.*?)```", re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of every closed fenced block, in order."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text or "")]


def first_code_block(text: str) -> str | None:
    blocks = code_blocks(text)
    return blocks[0][1] if blocks else None


def extract_mbpp_code(response: str) -> str:
    """After the last ``</think>``: the LAST ```python block that defines a function, else the last block, else
    an unclosed block's code, else the text itself."""
    text = strip_thinking_last(response)
    blocks = code_blocks(text)
    py = [c for lang, c in blocks if lang in ("python", "py", "python3")]
    for c in reversed(py):
        if "def " in c:
            return c
    for _, c in reversed(blocks):
        if "def " in c:
            return c
    if blocks:
        return blocks[-1][1]
    m = re.search(r"```[ \t]*(?:python|py|python3)?[^\n]*\n(.*)$", text, re.S)  # unclosed (truncated) block
    if m:
        return m.group(1)
    return text


def _after_last_think_keep_indent(text: str | None) -> str:
    """After the last ``</think>``, without the blank lines that follow it but with the first line's indentation
    (an unfenced function body starts indented; ``strip_thinking_last`` would break its first line)."""
    if not text:
        return ""
    i = text.rfind(THINK_END)
    if i >= 0:
        text = text[i + len(THINK_END):]
    return _drop_blank_lines(text)


def _drop_blank_lines(code: str) -> str:
    """Leading lines that hold only whitespace are dropped; the first code line keeps its indentation."""
    m = re.match(r"(?:[ \t\r\f\v]*\n)*", code)
    return code[m.end():] if m else code


def _defines(code: str, entry_point: str | None) -> bool:
    """Whether ``code`` parses as a module with a top-level ``def entry_point`` (any def when no name is given)."""
    try:
        compile(code, "<answer>", "exec", dont_inherit=True)  # also refuses `return` outside a function
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and (entry_point is None or n.name == entry_point)
               for n in tree.body)


def extract_humaneval_code(response: str, entry_point: str | None = None) -> str:
    """After the last ``</think>``: the FIRST fenced block (the anchor's ``humaneval_postprocess_v2``), else the code
    of an unclosed block, else the text; leading non-ASCII characters and blank lines dropped.

    The result is either a whole definition at column 0 or a function body (indented) that continues the prompt.
    An indented first line is kept as it is (a body may start with a nested ``def`` or an ``import``) unless the
    dedented code defines ``entry_point`` (a whole function indented as a block). The anchor's ``.lstrip()``
    broke the first line of every body that way."""
    text = _after_last_think_keep_indent(response)
    text = re.sub(r"^[^\x00-\x7f]+", "", text)
    code = first_code_block(text)
    if code is None:
        m = re.search(r"```[ \t]*(?:python|py|python3)?[^\n]*\n(.*)$", text, re.S)
        code = m.group(1) if m else text
    code = _drop_blank_lines(code)
    if code[:1] in (" ", "\t"):
        dedented = textwrap.dedent(code)
        if _defines(dedented, entry_point):
            return dedented
    return code


def extract_lcb_code(response: str) -> str:
    """LiveCodeBench: after the last ``</think>``, the code between the last two lines that contain a fence."""
    text = strip_thinking_last(response)
    lines = text.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return ""
    return "\n".join(lines[fences[-2] + 1:fences[-1]])
