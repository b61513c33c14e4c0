"""What 3D Slicer's nnInteractive extension does with a server, driven through the real `nninteractive-client`:
used in process by test_serve.py and, as a script, under another client version (`python nninteractive_flow.py
URL KEY CASE.npz LABEL AXIS` prints a JSON result). Slicer's order: claim, capabilities, set_image,
set_target_buffer, set_do_autozoom, reset_interactions, a box drawn on one slice (half-open (k, j, i) ranges,
extent 1 along the drawn axis), heartbeat, close."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import numpy as np


def slice_box(truth: np.ndarray, axis: int) -> tuple[list[list[int]], int]:
    """The ground truth's box on its largest slice along `axis`, as Slicer sends it: [[lo, hi]] x 3, half-open."""
    other = tuple(a for a in range(3) if a != axis)
    index = int(np.argmax(truth.sum(axis=other)))
    plane = np.take(truth, index, axis=axis)
    rows, cols = np.nonzero(plane.any(axis=1))[0], np.nonzero(plane.any(axis=0))[0]
    ranges = [[int(rows[0]), int(rows[-1]) + 1], [int(cols[0]), int(cols[-1]) + 1]]
    ranges.insert(axis, [index, index + 1])
    return ranges, index


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def open_session(url: str, key: str | None, image: np.ndarray, spacing, read_timeout: float = 600.0):
    """A claimed session with the image and a fresh uint8 target buffer, in Slicer's order. Slicer waits 60 s for a
    prediction; tests on a shared 2-core machine allow more (latency is measured in benchmarks/serve_latency.py)."""
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    session = nnInteractiveRemoteInferenceSession(url, api_key=key, read_timeout=read_timeout)
    buffer = np.zeros(image.shape, dtype=np.uint8)
    session.set_image(image[None], {"spacing": [float(s) for s in spacing]})
    session.set_target_buffer(buffer)
    session.set_do_autozoom(True)
    session.reset_interactions()
    return session, buffer


def box_on_slice(session, buffer: np.ndarray, truth: np.ndarray, axis: int, include: bool = True) -> dict:
    """Draw the ground truth's box on its largest slice along `axis`; what the buffer then holds."""
    ranges, index = slice_box(truth, axis)
    pasted = session.add_bbox_interaction(ranges, include_interaction=include, run_prediction=True)
    mask = buffer > 0
    off_slice = np.delete(mask, index, axis=axis)
    return {
        "bbox": ranges,
        "pasted": pasted,
        "dice": dice(mask, truth),
        "voxels": int(mask.sum()),
        "voxels_off_the_drawn_slice": int(off_slice.sum()),
    }


def main(argv: list[str]) -> int:
    url, key, case, label, axis = argv[0], argv[1] or None, argv[2], int(argv[3]), int(argv[4])
    with np.load(case) as data:
        image, labels, spacing = data["image"], data["labels"], data["spacing"]
    session, buffer = open_session(url, key, image, spacing)
    result = box_on_slice(session, buffer, labels == label, axis)
    result["client"] = version("nninteractive-client")
    result["supported_interactions"] = session.supported_interactions
    result["remaining_seconds"] = session.heartbeat()
    session.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
