"""The paper's reported numbers (I-DLM repository README @ 3342a17, arXiv 2604.11035), for side-by-side tables.

Quality: percent, one sample per item at temperature 1.0 (top-p 0.95, top-k 50), thinking mode, 32768 max
tokens; AIME is avg@16 (the paper's evaluation scripts, thuEcstasy/I-DLM). Throughput: tokens/s per request on
one H100 with SGLang.
"""

from __future__ import annotations

# benchmark key -> {model: value}
QUALITY: dict[str, dict[str, float | None]] = {
    "arc_c": {"I-DLM-8B": 95.8, "Qwen3-8B": 95.8, "LLaDA-2.1-mini": 90.2, "SDAR-8B": 91.9},
    "mmlu": {"I-DLM-8B": 82.4, "Qwen3-8B": 83.5, "LLaDA-2.1-mini": 74.5, "SDAR-8B": 78.6},
    "mmlu_pro": {"I-DLM-8B": 73.1, "Qwen3-8B": 75.1, "LLaDA-2.1-mini": 64.8, "SDAR-8B": 56.9},
    "gpqa_diamond": {"I-DLM-8B": 55.6, "Qwen3-8B": 58.9, "LLaDA-2.1-mini": 46.0, "SDAR-8B": 40.2},
    "gpqa": {"I-DLM-8B": 54.9, "Qwen3-8B": 55.4, "LLaDA-2.1-mini": 53.3, "SDAR-8B": None},
    "gsm8k": {"I-DLM-8B": 95.0, "Qwen3-8B": 96.0, "LLaDA-2.1-mini": 89.0, "SDAR-8B": 91.7},
    "math500": {"I-DLM-8B": 96.8, "Qwen3-8B": 95.8, "LLaDA-2.1-mini": 85.0, "SDAR-8B": 78.6},
    "mathbench": {"I-DLM-8B": 89.1, "Qwen3-8B": 93.1, "LLaDA-2.1-mini": 84.2, "SDAR-8B": 76.9},
    "aime24": {"I-DLM-8B": 69.6, "Qwen3-8B": 73.1, "LLaDA-2.1-mini": 43.3, "SDAR-8B": 10.0},
    "aime25": {"I-DLM-8B": 60.8, "Qwen3-8B": 65.4, "LLaDA-2.1-mini": 43.3, "SDAR-8B": 10.0},
    "humaneval": {"I-DLM-8B": 93.3, "Qwen3-8B": 95.1, "LLaDA-2.1-mini": 86.0, "SDAR-8B": 78.7},
    "mbpp": {"I-DLM-8B": 92.2, "Qwen3-8B": 93.4, "LLaDA-2.1-mini": 82.1, "SDAR-8B": 72.0},
    "lcb_v6": {"I-DLM-8B": 45.7, "Qwen3-8B": 50.3, "LLaDA-2.1-mini": 30.4, "SDAR-8B": 16.6},
    "ifeval": {"I-DLM-8B": 84.7, "Qwen3-8B": 84.7, "LLaDA-2.1-mini": 83.2, "SDAR-8B": 61.4},
}

# The two columns the quality table shows next to a run.
TABLE_MODELS = ("I-DLM-8B", "Qwen3-8B")

# Serving throughput, tokens/s per request (a range over datasets), single H100, SGLang, max_tokens 2048.
THROUGHPUT_PER_REQ: dict[str, dict[int, tuple[float, float]]] = {
    "I-DLM-8B (ISD N=4)": {32: (186.0, 193.0), 64: (124.0, 125.0)},
    "LLaDA-2.1-mini": {32: (51.0, 86.0), 64: (28.0, 57.0)},
    "SDAR-8B": {32: (43.0, 52.0), 64: (27.0, 28.0)},
}
