"""kvforge: compression-aware finetuning for a smaller KV cache.

The code lives in the repo's trainer/, models/ and kernels/ folders, installed as
kvforge.trainer, kvforge.models and kvforge.kernels.
"""

__version__ = "0.1.0"
