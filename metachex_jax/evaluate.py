"""Score a finished pretraining run on other labels: `python -m metachex_jax.evaluate --run=WORKDIR
--labels=nih_expert --labels_csv=FILE` (NIH's expert labels; metachex_jax/evaluation/expert_labels.py), or
`--labels=mimic|vindr --manual_dir=RAW` (MIMIC-CXR's or VinDr-CXR's test split with the labels mapped onto the run's
outputs; metachex_jax/evaluation/external_labels.py). A run's own evaluation on its splits happens during training
(metachex_jax/evaluation/evaluate.py).
"""

from __future__ import annotations

import argparse
import sys

from metachex_jax.core import console
from metachex_jax.data.raw.common import RawDataError
from metachex_jax.evaluation import expert_labels, external_labels

LABEL_SETS = ("nih_expert", *external_labels.DATASETS)


def main(argv: list[str] | None = None) -> int:
    """python -m metachex_jax.evaluate --run=WORKDIR --labels=nih_expert|mimic|vindr [--labels_csv=FILE ...]
    [--manual_dir=RAW] [--step=best] [--data_dir=DIR] [--n_boot=1000] [--seed=0]

    nih_expert: the NIH expert labels (evaluation/expert_labels.py; --labels_csv the merged file, or the test and
    the validation file). mimic, vindr: the dataset's test split, labels mapped onto the run's outputs
    (evaluation/external_labels.py; --manual_dir its raw copy, prepared at the run's resolution when the build is
    missing; mimic's --labels_csv: the 2.1.0 radiologist-labelled test file). Prints the table and writes
    WORKDIR/eval/<labels>_step{N}.{json,md} and _predictions.csv. Exit status 0, 1 for bad label files or a
    missing build, 2 for usage errors.
    """
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.evaluate", description=main.__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a pretraining workdir")
    parser.add_argument("--labels", required=True, choices=LABEL_SETS)
    parser.add_argument("--step", default="best", help="best (by validation mean AUROC), latest, or a step")
    parser.add_argument("--n_boot", type=int, default=1000, help="patient bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--manual_dir", help="mimic, vindr: the raw copy, prepared when its build is missing")
    expert_labels.add_arguments(parser)
    args = parser.parse_args(argv)
    console.setup()
    if args.labels == "nih_expert" and not args.labels_csv:
        parser.error("--labels=nih_expert needs --labels_csv=FILE (the merged file, or the test and the "
                     "validation file)")
    if args.labels == "vindr" and args.labels_csv:
        parser.error(f"--labels_csv is for nih_expert and mimic, not {args.labels}")
    if args.labels == "mimic" and len(args.labels_csv) > 1:
        parser.error("--labels=mimic takes one --labels_csv (mimic-cxr-2.1.0-test-set-labeled.csv)")
    try:
        if args.labels == "nih_expert":
            result = expert_labels.evaluate_run(args.run, args.labels_csv, step=args.step, data_dir=args.data_dir,
                                                n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size)
            text = expert_labels.markdown(result)
        else:
            result = external_labels.evaluate_run(
                args.run, args.labels, manual_dir=args.manual_dir, data_dir=args.data_dir,
                labels_csv=args.labels_csv[0] if args.labels_csv else None, step=args.step, n_boot=args.n_boot,
                seed=args.seed, batch_size=args.batch_size)
            text = external_labels.markdown(result)
    except (RawDataError, FileNotFoundError) as e:  # (a MissingDataError is one)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
