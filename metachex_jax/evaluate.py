"""Score a finished pretraining run on other labels: `python -m metachex_jax.evaluate --run=WORKDIR
--labels=nih_expert --labels_csv=FILE` (NIH's expert labels; metachex_jax/evaluation/expert_labels.py). A run's own
evaluation on its splits happens during training (metachex_jax/evaluation/evaluate.py).
"""

from __future__ import annotations

import argparse
import sys

from metachex_jax.core import console
from metachex_jax.data.raw.common import RawDataError
from metachex_jax.evaluation import expert_labels

LABEL_SETS = ("nih_expert",)


def main(argv: list[str] | None = None) -> int:
    """python -m metachex_jax.evaluate --run=WORKDIR --labels=nih_expert --labels_csv=FILE [--labels_csv=FILE2]
    [--step=best] [--data_dir=DIR] [--n_boot=1000] [--seed=0]

    Scores a pretraining run on the NIH expert labels (evaluation/expert_labels.py); prints the table and writes
    WORKDIR/eval/nih_expert_step{N}.{json,md} and _predictions.csv. Exit status 0, 1 for bad label files or a
    missing build, 2 for usage errors.
    """
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.evaluate", description=main.__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a pretraining workdir")
    parser.add_argument("--labels", required=True, choices=LABEL_SETS)
    parser.add_argument("--step", default="best", help="best (by validation mean AUROC), latest, or a step")
    parser.add_argument("--n_boot", type=int, default=1000, help="patient bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch_size", type=int, default=64)
    expert_labels.add_arguments(parser)
    args = parser.parse_args(argv)
    console.setup()
    if not args.labels_csv:
        parser.error("--labels=nih_expert needs --labels_csv=FILE (the merged file, or the test and the "
                     "validation file)")
    try:
        result = expert_labels.evaluate_run(args.run, args.labels_csv, step=args.step, data_dir=args.data_dir,
                                            n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size)
    except (RawDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(expert_labels.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
