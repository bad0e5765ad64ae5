"""Built datasets -> batches: what a run reads (`spec.py`: the typed data spec; `datasets.py`: the prepared splits,
or the demo's; `preflight.py`: the missing-data check `main` runs first), in one label space (`mixture.py`),
through the grain pipeline (`pipeline.py`) with host or device augmentation (`augment.py`, `device_augment.py`)."""
