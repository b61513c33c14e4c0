"""Regenerate docs/napari-widget.png: the qmedsam dock widget on the demo 3D CT with every box segmented.

Needs a screen for OpenGL: run it as `make napari-screenshot` (Xvfb + Mesa from Debian's packages, installed
when missing), or `xvfb-run -a python docs/napari_screenshot.py` yourself. The demo cases are built on first
use (`qmedsam data demo`, PyPI downloads) unless $QMEDSAM_DEMO_DIR points at a built copy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from qmedsam.files import atomic_write_bytes
from qmedsam.napari.io import demo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("napari-widget.png"))
    parser.add_argument("--case", default="3D_CT_TotalSeg_0001.npz")
    parser.add_argument("--model", default="int8")
    args = parser.parse_args()

    viewer = napari.Viewer(title="qmedsam")
    viewer.window.resize(1400, 800)
    viewer.open(str(demo_dir() / "cases" / args.case), plugin="qmedsam")
    _, widget = viewer.window.add_plugin_dock_widget("qmedsam", "Box-prompted segmentation")
    widget.set_model(args.model)
    widget.segment_all()
    widget.wait_until_idle()
    if not widget.image_layer.rgb:  # a volume: show the slice most rectangles were drawn on
        drawn = [int(round(rectangle[0, 0])) for rectangle in widget.boxes_layer.data]
        viewer.dims.set_current_step(0, max(set(drawn), key=drawn.count))
    widget.masks_layer.opacity = 0.5
    viewer.layers.selection.active = widget.boxes_layer
    widget.boxes_layer.mode = "pan_zoom"
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    image = viewer.screenshot(canvas_only=False, flash=False)
    import cv2

    ok, png = cv2.imencode(".png", cv2.cvtColor(np.asarray(image), cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    atomic_write_bytes(args.out, png.tobytes())
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}); {widget.status_label.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
