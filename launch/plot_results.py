#!/usr/bin/env python
"""Plot quality against KV cache size across runs: `python launch/plot_results.py results/*.json --out q.png`.

Inputs are JSONs of `launch/evaluate.py --task suite --json` (one per model, all on the same data and tokens).
Left panel: perplexity against the measured KV bytes/token as a fraction of the original's; right panel:
passkey accuracy at --passkey-context tokens (when any input measured it). Results with role `original` or
`finetuned-original` are drawn as reference lines (trainer/results_plot.py; docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="suite JSONs of launch/evaluate.py")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--passkey-context", type=int, default=4096,
                        help="context length of the passkey panel (default: %(default)s)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)

    from kvforge.trainer.results_plot import ResultsError, plot_results

    try:
        drawn = plot_results(args.results, args.out, passkey_context=args.passkey_context, title=args.title)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {drawn['out']}: {len(drawn['results'])} results, {drawn['passkey_points']} with passkey at "
          f"{args.passkey_context}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
