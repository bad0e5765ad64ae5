"""The synthetic demo data: `render.py` draws chest-X-ray-like images with planted signals, `records.py` samples
each set's records (labels, metadata), `write.py` writes the trees in the real datasets' layouts
(`python -m metachex_jax.demo_data`)."""
