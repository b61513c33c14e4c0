"""Scan intensities -> uint8 the way the challenge (and our demo and training) data was made.

CT: a Hounsfield window (default soft tissue, W400 L40, as the demo CT); anything else: the volume's
0.5-99.5 percentiles. The choice is returned as a record for the output's sidecar JSON.
"""

from __future__ import annotations

import numpy as np

from qmedsam.errors import UserFacingError

CT_PRESETS: dict[str, tuple[float, float]] = {  # name: (width, level) in HU
    "ct-abdomen": (400.0, 40.0),
    "ct-lung": (1500.0, -600.0),
    "ct-brain": (80.0, 40.0),
    "ct-bone": (1800.0, 400.0),
}
PERCENTILES = (0.5, 99.5)
WINDOW_CHOICES = ("auto", *CT_PRESETS, "percentile", "WIDTH,LEVEL")
AIR_HU = -500.0
"""`auto` treats a volume as CT when its values reach air (<= -500, only Hounsfield units do) and are whole
numbers; a CT crop without air, or an MR stored with negative values, needs an explicit --window."""


def parse_window(text: str) -> str | tuple[float, float]:
    """'auto' | a preset name | 'percentile' | 'WIDTH,LEVEL' (HU) -> a preset/mode name or (width, level)."""
    text = text.strip().lower()
    if text in ("auto", "percentile") or text in CT_PRESETS:
        return text
    parts = text.split(",")
    if len(parts) == 2:
        try:
            width, level = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if width > 0 and np.isfinite(level):
                return (width, level)
    raise UserFacingError(
        f"--window {text!r}: expected one of {', '.join(WINDOW_CHOICES[:-1])} or WIDTH,LEVEL in HU (width > 0)"
    )


def looks_like_ct(volume: np.ndarray) -> bool:
    values = np.asarray(volume)
    if values.dtype.kind == "f":
        sample = values.ravel()[:: max(1, values.size // 100_000)]
        if not np.allclose(sample, np.round(sample)):
            return False
    return float(values.min()) <= AIR_HU


def to_uint8(volume: np.ndarray, window: str | tuple[float, float], modality: str | None = None):
    """-> (uint8 volume, record). `modality` ('CT', 'MR', ...) decides `auto` when known (DICOM)."""
    if window == "auto":
        is_ct = modality.upper() == "CT" if modality else looks_like_ct(volume)
        window = "ct-abdomen" if is_ct else "percentile"
        reason = f"modality {modality}" if modality else ("values reach air (HU)" if is_ct else "not Hounsfield units")
    else:
        reason = "given"
    if window == "percentile":
        image, lo, hi = percentile_to_uint8(volume, *PERCENTILES)
        return image, {"method": "percentiles", "percentiles": list(PERCENTILES), "values": [lo, hi], "why": reason}
    name = window if isinstance(window, str) else "custom"
    width, level = CT_PRESETS[window] if isinstance(window, str) else window
    record = {"method": "CT window", "preset": name, "width": width, "level": level, "unit": "HU", "why": reason}
    return ct_to_uint8(volume, level=level, width=width), record


def ct_to_uint8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2.0
    scaled = (np.clip(hu.astype(np.float64), lo, lo + width) - lo) / width * 255.0
    return np.rint(scaled).astype(np.uint8)


def percentile_to_uint8(image: np.ndarray, low: float, high: float) -> tuple[np.ndarray, float, float]:
    values = image.astype(np.float64)
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8), lo, hi
