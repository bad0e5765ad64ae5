"""The paired AUROC tests' level when patients have several images, by simulation with known truth
(metachex_jax/evaluation/auc_test_level.py):

    python -m metachex_jax.auc_test_level [--datasets=2000] [--patients=200] [--seed=0] [--alpha=0.05]

Prints each test's rejection rate under the null, then one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json

from metachex_jax.core import console
from metachex_jax.evaluation import auc_test_level


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.auc_test_level",
                                     description="Does the paired AUROC test hold its level when patients have "
                                                 "several images? A simulation with known truth.")
    parser.add_argument("--datasets", type=int, default=2000)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    console.setup()
    result = auc_test_level.rejection_rates(args.datasets, args.patients, args.seed, args.alpha)
    for test, rate in result["rejection_rate"].items():
        print(f"{test}: rejects {rate:.2%} of {args.datasets} null data sets at alpha {args.alpha:g} "
              f"(Monte Carlo SE {result['monte_carlo_se'][test]:.2%})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
