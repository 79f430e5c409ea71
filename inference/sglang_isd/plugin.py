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
    from .spec_worker import ISDWorker  # imports SGLang's GPU-side modules: only once a worker is built

    return ISDWorker


def register() -> None:
    """Register ``--speculative-algorithm ISD`` and the paper's ``--dllm-algorithm IDLMBlockN`` spelling."""
    global _registered
    if _registered:
        return
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    from .compat import (
        check_sglang_version,
        install_capture_spec_info,
        install_dllm_spelling,
        install_finish_as_ar,
    )

    check_sglang_version()

    class ISDSpecAlgo(CustomSpecAlgo):
        # SGLang 0.5.15's CustomSpecAlgo lacks three methods its scheduler calls on every algorithm; they are
        # spelled out here with the values SGLang's own enum gives a non-EAGLE algorithm.
        def has_draft_kv(self) -> bool:
            return False  # drafts come from the verify forward's MASK rows: no separate draft KV chains

        def carries_draft_hidden_states(self) -> bool:
            return False  # nothing of a draft model crosses a prefill -> decode transfer

        def need_topk(self) -> bool:
            return False  # no EAGLE top-k tree to relay between iterations

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens: bool = True):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens)

    SpeculativeAlgorithm.register(ALGORITHM_NAME, supports_overlap=True, validate_server_args=validate_server_args,
                                  spec_class=ISDSpecAlgo)(_worker_factory)
    install_dllm_spelling()
    install_capture_spec_info()
    install_finish_as_ar()
    _registered = True
    log.info("idlm: registered --speculative-algorithm %s", ALGORITHM_NAME)
