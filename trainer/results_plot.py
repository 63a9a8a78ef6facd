"""Quality against KV cache size across runs: suite JSONs of `launch/evaluate.py --task suite` -> one PNG.

Each JSON is one model: a labelled point at (its measured KV bytes per token as a fraction of the original
architecture's, its perplexity), and in a second panel its passkey accuracy at one context length. Results
whose `role` is `original` or `finetuned-original` are also drawn as horizontal reference lines, so a
compressed run reads as "this far from the original / from the original finetuned on the same data".

Only comparable results are drawn together: every JSON must have measured perplexity on the same data
(source, split settings, seq_len) and the same number of predictions, else the numbers mean different things
and the plot is refused naming the files and the field that differs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

ROLES = ("original", "finetuned-original", "compressed")
# What perplexity numbers must share to be compared (keys of the JSON's perplexity.data, and the count).
COMPARED_DATA = ("source", "text_field", "split", "config_name", "seq_len", "eval_fraction", "max_documents", "seed")


class ResultsError(ValueError):
    """A result JSON that cannot be plotted: unreadable, a missing or mistyped field, or not comparable."""


@dataclass
class Result:
    path: Path
    label: str
    role: str
    perplexity: float
    tokens: int
    data: dict[str, Any]
    kv_bytes_per_token: float
    original_kv_bytes_per_token: float
    passkey: dict[str, float]          # context length (str) -> accuracy

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes_per_token / self.original_kv_bytes_per_token


def _field(payload: dict, path: Path, dotted: str, kind: type | tuple[type, ...]) -> Any:
    value: Any = payload
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ResultsError(f"{path}: missing field {dotted!r} (expected a JSON written by launch/evaluate.py "
                               "--task suite --json)")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ResultsError(f"{path}: field {dotted!r} is {value!r}; expected {names}")
    return value


def load_result(path: str | Path) -> Result:
    """One suite JSON, checked field by field.

    Raises:
        ResultsError: the file is missing or not JSON, or a needed field is absent or of the wrong type
            (naming the file and the field).
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(payload, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    role = _field(payload, path, "role", str)
    if role not in ROLES:
        raise ResultsError(f"{path}: field 'role' is {role!r}; expected one of {', '.join(ROLES)}")
    number = (int, float)
    perplexity = float(_field(payload, path, "perplexity.perplexity", number))
    kv = float(_field(payload, path, "kv_cache.bytes_per_token", number))
    original = float(_field(payload, path, "kv_cache.original_bytes_per_token", number))
    if not (kv > 0 and original > 0 and math.isfinite(kv) and math.isfinite(original)):
        raise ResultsError(f"{path}: kv_cache bytes_per_token {kv} / original_bytes_per_token {original}: expected "
                           "positive numbers")
    passkey = {}
    for context_len, entry in _field(payload, path, "passkey", dict).items():
        passkey[context_len] = float(_field(payload, path, f"passkey.{context_len}.accuracy", number))
    return Result(path=path, label=_field(payload, path, "label", str), role=role, perplexity=perplexity,
                  tokens=_field(payload, path, "perplexity.tokens", int),
                  data=_field(payload, path, "perplexity.data", dict), kv_bytes_per_token=kv,
                  original_kv_bytes_per_token=original, passkey=passkey)


def check_comparable(results: Sequence[Result]) -> None:
    """Raises ResultsError when two results measured perplexity on different data or token counts."""
    first = results[0]
    for other in results[1:]:
        for key in COMPARED_DATA:
            if first.data.get(key) != other.data.get(key):
                raise ResultsError(f"{other.path}: perplexity.data.{key} is {other.data.get(key)!r} but {first.path} "
                                   f"has {first.data.get(key)!r}; compare models on the same data and tokens")
        if first.tokens != other.tokens:
            raise ResultsError(f"{other.path}: perplexity.tokens is {other.tokens} but {first.path} has {first.tokens}; "
                               "give every model the same --seq-len, --batch-size and --max-batches")


def plot_results(paths: Sequence[str | Path], out: str | Path, *, passkey_context: int = 4096,
                 title: Optional[str] = None) -> dict[str, Any]:
    """Write the PNG; returns what was drawn ({"results", "passkey_points", "out"}).

    Raises:
        ResultsError: no inputs, a bad input (see load_result), or results that are not comparable.
    """
    if not paths:
        raise ResultsError("no result files given")
    results = [load_result(p) for p in paths]
    check_comparable(results)

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    key = str(passkey_context)
    with_passkey = [r for r in results if key in r.passkey]
    panels = 2 if with_passkey else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.0), squeeze=False)
    data = results[0].data
    styles = {"original": ("black", "--"), "finetuned-original": ("tab:green", ":")}

    def draw(ax, values: list[tuple[Result, float]], ylabel: str, fmt: str) -> None:
        for result, y in values:
            if result.role in styles:
                color, line = styles[result.role]
                ax.axhline(y, color=color, linestyle=line, linewidth=1.2,
                           label=f"{result.role}: {result.label} ({fmt.format(y)})")
                ax.scatter([result.kv_fraction], [y], color=color, marker="s", zorder=3)
                continue  # named in the legend: reference points share x = 1 and would overprint each other
            ax.scatter([result.kv_fraction], [y], color="tab:blue", zorder=3)
            ax.annotate(f"{result.label}\n{fmt.format(y)}, {result.kv_bytes_per_token:,.0f} B/tok",
                        (result.kv_fraction, y), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_xlabel(f"KV cache bytes/token, fraction of the original "
                      f"({results[0].original_kv_bytes_per_token:,.0f} B/tok)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1.1)
        ax.margins(y=0.15)  # room above the top point for its label
        ax.grid(True, alpha=0.3)
        if any(r.role in styles for r, _ in values):
            ax.legend(fontsize=8, loc="best")

    rows = results[0].tokens // max(1, int(data.get("seq_len") or 2) - 1)
    draw(axes[0][0], [(r, r.perplexity) for r in results], "perplexity (lower is better)", "{:.2f}")
    axes[0][0].set_title(f"perplexity: {rows} x {data.get('seq_len')} tokens of {Path(str(data.get('source'))).name}",
                         fontsize=10)
    if with_passkey:
        ax = axes[0][1]
        draw(ax, [(r, r.passkey[key]) for r in with_passkey], f"passkey accuracy at {passkey_context} tokens", "{:.2f}")
        ax.set_ylim(-0.05, 1.15)
        missing = [r.label for r in results if key not in r.passkey]
        ax.set_title(f"passkey @ {passkey_context}" + (f" (not measured: {', '.join(missing)})" if missing else ""),
                     fontsize=10)
    fig.suptitle(title or "Quality against KV cache size", fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"results": [r.label for r in results], "passkey_points": len(with_passkey), "out": str(out)}


__all__ = ["ROLES", "ResultsError", "Result", "load_result", "check_comparable", "plot_results"]
