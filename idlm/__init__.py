"""I-DLM: Introspective Diffusion Language Models.

Core package: checkpoint config (`idlm.config`), conversion (`idlm.convert`), the attention rule
(`idlm.masks`), the [x_t | x_0] objective (`idlm.objective`, `idlm.losses`) and the `idlm` CLI.
"""

__version__ = "0.1.0"
