"""A PNG plot checked for what it shows: its size in pixels, and coloured marks across it (not a blank canvas)."""

import io
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

DPI = 110  # what hf_relearn saves its plots with


def assert_plot(png: Path | bytes, inches: tuple[float, float], min_marks: int = 300) -> int:
    """``png`` is a figure of ``inches`` (width, height) at 110 dpi with its data drawn: at least ``min_marks`` coloured
    pixels (lines, bars, markers; axes, text and grid are black, grey or white) spanning half its width or more, so
    that a blank figure, bare axes or a legend alone fail. Returns the number of coloured pixels."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = mpimg.imread(io.BytesIO(data), format="png")
    width, height = inches
    assert image.shape == (round(height * DPI), round(width * DPI), 4), image.shape
    rgb = image[..., :3]
    coloured = rgb.max(axis=-1) - rgb.min(axis=-1) > 0.25
    columns = np.flatnonzero(coloured.any(axis=0))
    assert coloured.sum() >= min_marks, f"{coloured.sum()} coloured pixels: nothing drawn"
    assert columns[-1] - columns[0] >= image.shape[1] / 2, f"coloured marks span columns {columns[0]}..{columns[-1]}"
    return int(coloured.sum())
