"""Benchmarks: `python -m metachex_jax.bench MODE [options]` (`MODE --help` lists a mode's options).

Every mode prints human-readable lines, then, last, exactly one JSON object with all its figures, and compares
against its reference in the same run (machines are noisy: ratios within one run are what count). Each mode is a
module of this package with `main(argv) -> dict` (the figures it printed last).

Adding a mode: write `bench/<mode>.py` with that `main`, and add one line to MODES.
"""

MODES = {  # mode -> what it measures (its module is metachex_jax.bench.<mode>)
    "train": "DenseNet train step (forward, backward, Adam) in each form (unrolled / scanned dense blocks, with "
             "and without remat): img/s, compile time, step memory; --torch: torchvision's in the same run",
    "loop": "the full training loop (input + step + logging) of a config against its bare train step",
    "data": "the input pipeline's img/s against a naive per-sample PNG decode + resize loader; dataset build img/s",
    "probe": "the TB linear probe (10-fold CV, inner L2 search) against scikit-learn; frozen-feature extraction",
    "features": "what a pretraining run's pooled features know: per-label linear-probe AUROC on fresh NIH-like "
                "demo images against an untrained network's features",
    "predict": "inference: batched forward (--torch: against torchvision's eager inference), files to predictions "
               "with decoding overlapped, Grad-CAM cost per image",
    "profile": "per-op profile of the train step: forward / backward / optimizer, convolutions against BatchNorm, "
               "elementwise and concatenation (--torch: torchvision's step the same way)",
    "suite": "all of the above with settings for the backend found (--quick: the short one), on data it makes; "
             "writes one JSON and one markdown table with the machine, library versions and load",
}
