"""Describe a pretraining run's training images in feature space, for `predict`'s out-of-distribution flags:
`python -m metachex_jax.ood WORKDIR [--step=best]`.

    python -m metachex_jax.ood /tmp/metachex_demo                   # the best checkpoint (training does this)
    python -m metachex_jax.ood /tmp/metachex_demo --step=1200 --max_images=4000

Writes WORKDIR/ood/step_<N>.npz: the pooled features' mean and Ledoit-Wolf-shrunk covariance of a seeded sample
of at most --max_images training images, and the threshold (--quantile of the validation images' Mahalanobis
distances, as an order statistic); `predict --model=WORKDIR --step=N` then writes `ood_distance` and `ood_flag`
and `export` carries the description. Training writes it for its best checkpoint (config.ood); this command is
for another step or a run from before. Exit status 0, 1 when the run or its data is missing, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys

from metachex_jax.contract.ood import DEFAULT_QUANTILE
from metachex_jax.core import console
from metachex_jax.core.errors import ModelError
from metachex_jax.training import ood_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.ood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="a pretraining workdir")
    parser.add_argument("--step", default="best", help="best (by validation mean AUROC), latest, or a step")
    parser.add_argument("--max_images", type=int, default=2000, help="training images described (a seeded "
                                                                     "sample), and validation images at most")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                        help="of the validation images' distances: the threshold (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="of the samples")
    parser.add_argument("--data_dir", default=None, help="where the run's prepared datasets are now (default: "
                                                         "where the run read them)")
    args = parser.parse_args(argv)
    console.setup()
    if not 0 < args.quantile < 1:
        parser.error(f"--quantile={args.quantile}: must be in (0, 1)")
    step = args.step if args.step in ("best", "latest") else int(args.step)
    try:
        path = ood_reference.describe_run(args.workdir, step=step, max_images=args.max_images,
                                          quantile=args.quantile, seed=args.seed, data_dir=args.data_dir)
    except (FileNotFoundError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
