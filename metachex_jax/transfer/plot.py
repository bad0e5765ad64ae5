"""ROC curves as a PNG, drawn with Pillow (already a dependency; no plotting library needed).

`write_roc_png(path, title, curves)` draws each (label, fpr, tpr) as a step curve on the unit square with the
chance diagonal, axes ticks every 0.2 and a legend; written atomically to a local or gs:// path
(`files.write_atomic`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from metachex_jax import files

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def write_roc_png(path: str, title: str, curves: list[tuple[str, np.ndarray, np.ndarray]], size: int = 560) -> None:
    left, top, plot = 60, 56, size - 100
    image = Image.new("RGB", (size, top + plot + 54 + 16 * len(curves)), "white")
    draw = ImageDraw.Draw(image)

    def xy(fpr, tpr):
        return left + fpr * plot, top + (1 - tpr) * plot

    draw.text((left, 10), title, fill="black", font=_font(18))
    draw.rectangle([left, top, left + plot, top + plot], outline="black")
    for t in np.linspace(0, 1, 6):
        x, y = xy(t, t)
        draw.line([x, top + plot, x, top + plot + 5], fill="black")
        draw.text((x - 8, top + plot + 8), f"{t:.1f}", fill="black")
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 30, y - 6), f"{t:.1f}", fill="black")
    draw.text((left + plot // 2 - 60, top + plot + 24), "false positive rate", fill="black")
    draw.text((4, top - 16), "true positive rate", fill="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
    for i, (label, fpr, tpr) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        points = [xy(float(f), float(t)) for f, t in zip(fpr, tpr) if np.isfinite(f) and np.isfinite(t)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        y = top + plot + 44 + 16 * i
        draw.line([left, y + 6, left + 20, y + 6], fill=color, width=3)
        draw.text((left + 26, y), label, fill="black")
    png = io.BytesIO()
    image.save(png, format="PNG")
    files.write_atomic(path, png.getvalue())
