"""Image files -> 8-bit gray pixels (`images.py`, the one reader: PNG, JPEG, DICOM, ...; `resize.py`, the one
resize) and the pixel geometry every user of those pixels shares (`geometry.py`: square box, centre crop, the
evaluation view). Runs in spawned decoding workers: imports neither jax nor tensorflow_datasets."""
