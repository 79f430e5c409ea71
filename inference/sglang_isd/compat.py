"""The only patch of SGLang internals: accept the paper's ``--dllm-algorithm IDLMBlockN`` spelling.

SGLang's dLLM registry is a pkgutil scan of its own package and the dLLM runtime cannot keep a verified prefix's KV
(docs/serving.md), so ISD is not a dLLM algorithm here. To let the paper's command line work anyway, a BEFORE hook
on ``ServerArgs.__post_init__`` (SGLang's own plugin hook registry) rewrites ``--dllm-algorithm IDLMBlockN
--dllm-algorithm-config Y`` into ``--speculative-algorithm ISD`` before SGLang resolves its arguments
(`config.translate_dllm_args`). It relies on two internals: the name ``ServerArgs.__post_init__`` and the fields
``dllm_algorithm`` / ``dllm_algorithm_config`` / ``speculative_*``. tests/test_sglang_isd.py pins them to the
version below and fails when SGLang moves.
"""

from __future__ import annotations

import logging

from .config import SGLANG_VERSION, translate_dllm_args

log = logging.getLogger(__name__)

HOOK_TARGET = "sglang.srt.server_args.ServerArgs.__post_init__"
PATCHED_FIELDS = ("dllm_algorithm", "dllm_algorithm_config", "speculative_algorithm", "speculative_num_draft_tokens")


def check_sglang_version() -> None:
    """Warn (loudly) when the installed SGLang is not the version this integration was written against."""
    from importlib.metadata import version

    installed = version("sglang")
    if installed != SGLANG_VERSION:
        log.warning("idlm ISD plugin was written for sglang==%s but %s is installed: the spec-worker interface and "
                    "the --dllm-algorithm translation may not work", SGLANG_VERSION, installed)


def _before_post_init(self, *args, **kwargs):
    translate_dllm_args(self)
    return None  # keep the original arguments


def install_dllm_spelling() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGET, _before_post_init, HookType.BEFORE)
