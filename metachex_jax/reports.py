"""Recompute every metric of a per-image predictions CSV (metachex_jax/evaluation/reports.py):

    python -m metachex_jax.reports recompute PREDICTIONS_CSV [--n_boot 1000] [--seed 0] [--json OUT]

prints the markdown table of `metrics.evaluate_multitask` on the CSV alone (and writes its JSON with --json).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metachex_jax.core import console
from metachex_jax.evaluation import reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.reports",
                                     description="Writing and reading evaluation outputs: per-image prediction CSVs, "
                                                 "metric JSON, markdown tables.")
    commands = parser.add_subparsers(dest="command", required=True)
    recompute = commands.add_parser("recompute", help="recompute the metrics of a per-image predictions CSV")
    recompute.add_argument("predictions_csv")
    recompute.add_argument("--n_boot", type=int, default=1000, help="patient bootstrap resamples")
    recompute.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    recompute.add_argument("--alpha", type=float, default=0.05, help="CI level is 1 - alpha")
    recompute.add_argument("--json", help="also write the metrics as JSON to this path")
    args = parser.parse_args(argv)
    console.setup()
    try:
        result = reports.recompute(args.predictions_csv, n_boot=args.n_boot, seed=args.seed, alpha=args.alpha)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        reports.write_json(args.json, result)
    sys.stdout.write(reports.multitask_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
