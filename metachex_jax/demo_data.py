"""Write the synthetic demo data (metachex_jax/demo/write.py: the trees in the real datasets' layouts):

    python -m metachex_jax.demo_data --out=DIR [--seed=0] [--num_nih=2000] [--num_shenzhen=662]
        [--num_montgomery=138] [--num_hospital=200] [--size=256] [--num_workers=N]

Prints the tree's paths, parameters and counts as JSON; a folder holding the same tree is reused.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Sequence

from metachex_jax.core import console
from metachex_jax.demo.write import write_demo_data


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Synthetic demo data: chest-X-ray-like PNGs with "
                                     "planted, learnable signals, in the REAL on-disk layouts.")
    parser.add_argument("--out", required=True, help="folder to create (or reuse if it holds the same demo tree)")
    default = {name: p.default for name, p in inspect.signature(write_demo_data).parameters.items()}  # one source
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument("--num_nih", type=int, default=default["num_nih"])
    parser.add_argument("--num_shenzhen", type=int, default=default["num_shenzhen"])
    parser.add_argument("--num_montgomery", type=int, default=default["num_montgomery"])
    parser.add_argument("--num_hospital", type=int, default=default["num_hospital"],
                        help="images of the hospital CSV dataset")
    parser.add_argument("--size", type=int, default=default["size"],
                        help="image size in pixels (NIH images are size x size)")
    parser.add_argument("--num_workers", type=int, default=None, help="processes (default: CPU count)")
    args = parser.parse_args(argv)
    console.setup()
    result = write_demo_data(args.out, args.seed, args.num_nih, args.num_shenzhen, args.num_montgomery,
                             args.size, args.num_workers, args.num_hospital)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
