"""Turning a decoded image into the RGB image every backbone expects, without losing what it shows.

- EXIF orientation is applied (a phone photo taken upright is stored upright), except where the paper protocol
  reproduces the authors' decoder, which ignores it (webdataset's PIL decoding).
- High bit depths are scaled, not clipped: 16-bit integer modes (I;16*) by 255/65535; 32-bit integer (I) and
  float (F) images by their own range (0..255 and 0..65535 integers kept as 8/16-bit data; floats in [0, 1] as
  fractions; anything else min-max). PIL's own convert("RGB") clips these to 255, which turns most 16-bit
  photographs white.
- Every other mode (1, L, P, LA, PA, RGBA, CMYK, YCbCr, ...) goes through PIL's convert("RGB"), as torchvision,
  timm and the authors' pipeline do (alpha is dropped, not composited).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

RULES = {"exif_orientation": "applied unless the paper protocol reproduces the authors' decoder",
         "high_bit_depth": "16-bit scaled by 255/65535; 32-bit integer and float by their range",
         "other_modes": "PIL convert('RGB') (alpha dropped)"}


def _scaled_gray(raw: np.ndarray, bits16: bool) -> Image.Image:
    is_float = np.issubdtype(raw.dtype, np.floating)
    a = raw.astype(np.float64)
    if bits16:
        out = a * (255.0 / 65535.0)
    elif is_float and np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
        out = a * 255.0
    elif a.min() >= 0 and a.max() <= 255:
        out = a
    elif a.min() >= 0 and a.max() <= 65535:
        out = a * (255.0 / 65535.0)
    else:
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(out)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, exif: bool = True) -> Image.Image:
    """The image as 8-bit RGB (see the module's rules)."""
    if exif:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I;16"):
        img = _scaled_gray(np.asarray(img), bits16=True)
    elif mode in ("I", "F"):
        img = _scaled_gray(np.asarray(img), bits16=False)
    return img if img.mode == "RGB" else img.convert("RGB")
