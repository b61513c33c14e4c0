"""What a decoder IR is fed, in one place: the image embedding and boxes, and (since clicks) points with labels.

A model folder exported before clicks has a decoder with the first two inputs only; it still serves boxes
and refuses clicks by name, so older folders keep working.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmedsam.errors import UserFacingError

CLICK_INPUTS = ("points", "point_labels")


def takes_clicks(decoder) -> bool:
    """Whether an OpenVINO decoder (model or compiled model) has the click inputs."""
    names = {name for port in decoder.inputs for name in port.get_names()}
    return set(CLICK_INPUTS) <= names


def checked_clicks(
    boxes: np.ndarray, points: np.ndarray | None, point_labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Clicks as the decoder takes them, (B, N, 2) and (B, N) float32 (N = 0 without clicks), for B boxes."""
    batch = np.asarray(boxes).reshape(-1, 4).shape[0]
    if points is None and point_labels is None:
        return np.zeros((batch, 0, 2), np.float32), np.zeros((batch, 0), np.float32)
    if points is None or point_labels is None:
        raise ValueError("decode: points and point_labels go together")
    points = np.asarray(points, np.float32).reshape(batch, -1, 2)
    point_labels = np.asarray(point_labels, np.float32).reshape(batch, -1)
    if point_labels.shape[1] != points.shape[1]:
        raise ValueError(f"decode: {points.shape[1]} points but {point_labels.shape[1]} labels per box")
    return np.ascontiguousarray(points), np.ascontiguousarray(point_labels)


def decoder_feed(
    decoder,
    embedding: np.ndarray,
    boxes: np.ndarray,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    model_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """The decoder's inputs by name for (1, 256, 64, 64) embedding, (B, 4) model-space boxes and optional clicks."""
    boxes = np.ascontiguousarray(boxes, np.float32).reshape(-1, 1, 4)
    feed = {"image_embedding": np.ascontiguousarray(embedding, np.float32), "boxes": boxes}
    if takes_clicks(decoder):
        feed["points"], feed["point_labels"] = checked_clicks(boxes, points, point_labels)
    elif points is not None and np.asarray(points).size:
        where = f"{model_dir}: " if model_dir is not None else ""
        raise UserFacingError(
            f"{where}this model's decoder takes boxes only (exported before clicks); use the shipped model or "
            "re-export with this version of qmedsam to refine masks with clicks"
        )
    return feed
