"""ISD inside SGLang 0.5.15: a single-model speculative worker registered through SGLang's plugin entry points.

Modules (only ``worker`` and ``plugin`` import SGLang; the rest is plain Python/PyTorch and tested on CPU):

* ``config``: `ISDServeConfig`, the paper-style YAML, server-argument validation and the launch command line;
* ``stepper``: `ISDStateTable`, per-request ISD state indexed by SGLang's req-pool slot, and one decode step's
  bookkeeping over the core functions of `idlm.isd` (layout, verification, accept lengths);
* ``worker``: `ISDWorker`, the spec-V2 worker SGLang's scheduler drives (one TARGET_VERIFY forward of 2N-1 rows);
* ``plugin``: the ``sglang.srt.plugins`` entry point (registers the algorithm ``ISD``);
* ``compat``: the one patch of SGLang internals (the paper's ``--dllm-algorithm IDLMBlockN`` spelling).

See docs/serving.md for the design and its reasons.
"""
