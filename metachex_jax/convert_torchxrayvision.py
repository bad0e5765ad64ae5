"""Convert torchxrayvision's DenseNet-121 chest X-ray weights into a model directory every tool here reads.

    python -m metachex_jax.convert_torchxrayvision \\
        ~/.torchxrayvision/nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt ~/models/xrv-nih \\
        --weights_name=densenet121-res224-nih

SRC: a torchxrayvision release file (a whole pickled `torchxrayvision.models.DenseNet`, in torch's zip or legacy
format), or a state dict of that module (`.pt`/`.pth`, `.safetensors`, `.npz`). `.pt`/`.pth` files are read by
`metachex_jax.interop.torch_pickle`: no torch needed, and nothing from the file is imported or run.

--weights_name (required) names the published weights; it picks the 18 label names ('' for labels those weights
were never trained on) and the per-label operating thresholds, which the files do not carry: torchxrayvision keeps
them in `model_urls` (torchxrayvision/models.py); `metachex_jax.interop.torchxrayvision.WEIGHTS` is a copy of that
table, from its `TABLE_VERSION`.

DEST: a model directory (`metachex_jax.models.saved`) of kind "torchxrayvision" (`models/xrv.py`): the 1-channel
DenseNet backbone, the 18-way classifier, the labels and thresholds (`model_config`), the input contract (centre
square, resized to 224, 1 channel, [-1024, 1024]: `PixelContract(224, 224, "xrv", "crop_resize")`), the named
outputs, and the provenance: the source file's SHA-256, the weights name and address, the table version.
Use it with `predict --model=DEST` (and Grad-CAM, `export`), as `--config.model_init=DEST` for pretraining, and in
a transfer comparison's `compare_with`.

Every tensor is checked against the architecture (`convert.convert_state_dict`): a ResNet, an autoencoder, a
3-channel torchvision DenseNet or a state dict with missing, extra or misshapen keys is refused with every
mismatched key listed. DEST is written under a temporary name and renamed into place: nothing half-converted.
"""

from __future__ import annotations

import argparse
import os
import sys

from metachex_jax.core import console
from metachex_jax.interop import torchxrayvision


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.convert_torchxrayvision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="torchxrayvision weights: the release .pt, or a state dict (.pt/.pth, "
                                    ".safetensors, .npz)")
    parser.add_argument("dest", help="the model directory to create")
    parser.add_argument("--weights_name", required=True, choices=sorted(torchxrayvision.WEIGHTS),
                        help="which published weights SRC holds (picks the labels and operating thresholds)")
    parser.add_argument("--arch", default=None, help="override the DenseNet architecture (default: the table's, "
                                                     "densenet121)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DEST model directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup()
    try:
        card = torchxrayvision.convert_to_directory(args.src, args.dest, args.weights_name, arch=args.arch,
                                                    overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # CheckpointReadError, StateDictMismatchError
        print(f"error: {e}", file=sys.stderr)
        return 1
    trained = [label for label in card["model_config"]["labels"] if label]
    print(f"weights:  {args.weights_name} ({card['training']['data']}); sha256 {card['source']['sha256']}")
    print(f"outputs:  {len(trained)} labels, each as a probability and (with a threshold) _opnorm: "
          + ", ".join(trained))
    print(f"input:    {card['input']['description']}")
    print(f"written:  {os.path.abspath(args.dest)}")
    print(f"use it:   python -m metachex_jax.predict --model={os.path.abspath(args.dest)} IMAGES...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
