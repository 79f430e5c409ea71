"""ISD inside SGLang 0.5.15: a single-model speculative worker registered through SGLang's plugin entry points.

Modules (only ``spec_worker`` imports SGLang at module level, ``plugin`` and ``compat`` when called; the rest is
plain Python/PyTorch and tested on CPU):

* ``config``: `ISDServeConfig`, the paper-style YAML, server-argument validation and the launch command line;
* ``stepper``: `ISDStateTable`, per-request ISD state indexed by SGLang's req-pool slot, and one decode step's
  bookkeeping over the core functions of `idlm.isd` (layout, verification, accept lengths);
* ``spec_worker``: `ISDWorker`, the spec-V2 worker SGLang's scheduler drives (one TARGET_VERIFY forward of
  `idlm.config.step_rows` rows per request);
* ``plugin``: the ``sglang.srt.plugins`` entry point (registers the algorithm ``ISD``);
* ``compat``: every patch of SGLang internals (the paper's ``--dllm-algorithm IDLMBlockN`` spelling, the triton
  backend's verify attention kernel), each pinned to SGLang 0.5.15 by a test;
* ``verify_attention``: the GQA-packed verify attention kernel (Triton) that ``compat`` can put in;
* ``gated_lora``: R-ISD, a LoRA on the MASK rows only, wrapped around the served model's projections;
* ``profiler``: the opt-in step-time breakdown (``IDLM_ISD_PROFILE``).

See docs/serving.md for the design and its reasons.
"""
