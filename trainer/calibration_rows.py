"""The token rows calibration reads: packed real text from the *train* split of a data source.

models/calibration.py collects statistics over rows it is given (token ids, [N, seq_len]); this is where the
trainer and launch/compress.py make those rows, through trainer/data.py, so calibration never sees the eval
documents that perplexity is measured on.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..models.calibration import CalibrationError
from .data import build_packed_datasets


def load_calibration_rows(tokenizer: Any, eos_token_id: int, *, source: str, tokens: int, seq_len: int,
                          cache_dir: Optional[str] = None, show_progress: bool = True) -> torch.Tensor:
    """The first ceil(tokens / seq_len) packed rows [N, seq_len] of the *train* split of `source`.

    Uses `trainer.data.build_packed_datasets` (same split seed and cache as training), so calibration
    never sees the eval documents that perplexity is measured on.

    Raises:
        CalibrationError: tokens/seq_len out of range, or the train split has fewer tokens than asked for.
    """
    if tokens < 1 or seq_len < 2:
        raise CalibrationError(f"calibration needs tokens >= 1 and seq_len >= 2, got tokens={tokens}, seq_len={seq_len}")
    packed = build_packed_datasets({"source": source, "seq_len": seq_len, "cache_dir": cache_dir},
                                   tokenizer, eos_token_id, show_progress=show_progress)
    n_rows = -(-tokens // seq_len)
    available = packed.train.shape[0]
    if n_rows > available:
        raise CalibrationError(
            f"calibration asks for {tokens} tokens ({n_rows} rows of {seq_len}) but the train split of "
            f"{source!r} has {available} rows ({available * seq_len} tokens); lower the calibration tokens"
        )
    return packed.train[:n_rows].long()
