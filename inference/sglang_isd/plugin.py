"""The ``sglang.srt.plugins`` entry point: registers ISD with SGLang in every SGLang process.

SGLang 0.5.15 calls every installed general plugin early in the launcher (before its server arguments are resolved)
and again in each scheduler process. `register` is idempotent there (SGLang guards its own loop; a second call in
the same process is a no-op here too).
"""

from __future__ import annotations

import logging

from .config import ALGORITHM_NAME, validate_server_args

log = logging.getLogger(__name__)

_registered = False


def _worker_factory(server_args):
    from .worker import ISDWorker  # imports SGLang's GPU-side modules: only once a worker is built

    return ISDWorker


def register() -> None:
    """Register ``--speculative-algorithm ISD`` and the paper's ``--dllm-algorithm IDLMBlockN`` spelling."""
    global _registered
    if _registered:
        return
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    from .compat import check_sglang_version, install_dllm_spelling

    check_sglang_version()

    class ISDSpecAlgo(CustomSpecAlgo):
        def has_draft_kv(self) -> bool:
            return False  # drafts come from the verify forward's MASK rows: no separate draft KV chains

    SpeculativeAlgorithm.register(ALGORITHM_NAME, supports_overlap=False, validate_server_args=validate_server_args,
                                  spec_class=ISDSpecAlgo)(_worker_factory)
    install_dllm_spelling()
    _registered = True
    log.info("idlm: registered --speculative-algorithm %s", ALGORITHM_NAME)
