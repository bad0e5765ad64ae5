"""Data, in three layers: `raw/` (raw copies -> rows), `build/` (rows -> prepared datasets), `input/` (prepared
datasets -> batches)."""
