"""The "did you mean" hint that kvforge's errors give for a misspelt key, name or choice.

The files shipped beside exported weights (configuration_kvforge.py, modeling_kvforge.py) load without
kvforge installed and keep their own copy.
"""

from __future__ import annotations

import difflib
from typing import Iterable


def close_matches(word: object, choices: Iterable[object], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """Up to `n` of `choices` (as strings) that resemble `word`, best first."""
    return difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(word: object, choices: Iterable[object], n: int = 1, cutoff: float = 0.6, prefix: str = "",
                 paren: bool = False) -> str:
    """A hint to append to an error message, empty when nothing in `choices` resembles `word`.

    "; did you mean 'lr'?" by default, " (did you mean 'lr'?)" with `paren`, "'a' or 'b'" for several
    matches; `prefix` is put before each match (a dotted key's section, e.g. "training.").
    """
    close = close_matches(word, choices, n=n, cutoff=cutoff)
    if not close:
        return ""
    phrase = f"did you mean {' or '.join(repr(prefix + c) for c in close)}?"
    return f" ({phrase})" if paren else f"; {phrase}"
