"""Data: raw-layout readers, TFDS builders, the grain input pipeline and the synthetic demo data."""
