"""Applying a model to files: `Predictor` (predictor.py; forward.py is the pure function it runs), `predict`'s
outputs (predict.py), Grad-CAM maps and overlays (gradcam.py), and export without the model code (export.py,
exported.py)."""
