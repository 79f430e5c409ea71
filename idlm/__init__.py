"""I-DLM: Introspective Diffusion Language Models.

Core package: checkpoint config (`idlm.config`), conversion (`idlm.convert`), checkpoint I/O
(`idlm.checkpoint`), the attention rule (`idlm.masks`), the [x_t | x_0] objective (`idlm.objective`,
`idlm.losses`), the ISD step math (`idlm.isd`, `idlm.sampling`), tiny offline models (`idlm.tiny`) and the
`idlm` CLI. The parts live in `idlm.training`, `idlm.inference` and `idlm.eval` (folders training/,
inference/, eval/).
"""

__version__ = "0.1.0"
