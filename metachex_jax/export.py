"""Export a model as a self-contained directory that runs without this project's model code.

    python -m metachex_jax.export RUN_OR_TB_WORKDIR --out=DIR [--step=best] [--platforms=cpu,cuda,tpu]
    python -m metachex_jax.predict --model=DIR xray.png      # runs it (the model code is never imported)

DIR holds (see `metachex_jax.models.saved`):

    DIR/model.json                    the model card: input contract (`PixelContract`), output names, kinds and
                                      thresholds in order, training data, headline metrics with their 95% CIs
                                      of the exported step (`step_metrics`), the source run, versions, and what
                                      was exported
    DIR/exported/forward.jaxexport    the whole inference function, `(weights, uint8 images (b, S, S)) ->
                                      (values (b, K), features (b, F))`, serialised with `jax.export`:
                                      batch-size polymorphic (b is symbolic), lowered for CPU, CUDA and TPU, and
                                      without shardings, so the caller spreads batches over the devices it has
    DIR/exported/weights.npz          the weights as numpy arrays, in the function's argument order
    DIR/ood.npz                       the model's OOD description (the card's "ood" entry), when its source has
                                      one: predict's ood_distance and ood_flag columns

Grad-CAM is not exported: `predict --heatmaps` on an exported model says so and names the workdir to use.
"""

from __future__ import annotations

import argparse
import sys

from metachex_jax.contract.card import read_card
from metachex_jax.core import console
from metachex_jax.core.errors import ModelError
from metachex_jax.serving import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a pretraining workdir, a transfer workdir (its TB model) or a model directory")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--step", default="best", help="pretraining checkpoint: best, latest or a step number")
    parser.add_argument("--platforms", default=",".join(export.DEFAULT_PLATFORMS),
                        help="comma-separated jax.export platforms (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    console.setup()
    step = args.step if args.step in ("best", "latest") else int(args.step)
    try:
        out = export.export(args.model, args.out, step=step, platforms=[p.strip() for p in args.platforms.split(",")],
                     overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = read_card(out)
    print(f"exported {args.model} -> {out}")
    print(f"  input:   {card['input']['description']}")
    print(f"  outputs: {', '.join(o['name'] for o in card['outputs']) or '(features only)'}")
    print(f"  OOD:     {'threshold %.4g' % card['ood']['threshold'] if 'ood' in card else card.get('ood_absent')}")
    print(f"  run it:  python -m metachex_jax.predict --model={out} IMAGES...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
