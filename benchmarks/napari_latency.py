"""Box drawn -> mask shown in the napari widget, int8 vs fp32, in one run (a benchmark, not a test).

A real viewer (Qt offscreen unless a display is set) and the real widget; rectangles are added as a user's
drawing adds them, and each figure is the widget's own measurement from the rectangle's 'added' event to the
Labels layer updated (before the screen redraw). Reported per model:
- first box after choosing the model (model compile + encode + decode),
- first box on a new 2D image (encode + decode), later boxes on it (decoder only), median;
- a click on a drawn 2D box (the decoder alone, every click so far with the box), median of 5, when the model's
  decoder takes clicks;
- a 3D box over every slice of a volume (each slice encoded once), then a second box on the same slices;
- a click on that 3D box's middle slice (the object again from its box and clicks, each click carried to the
  slices it reaches; the decoder alone), median of 5.

    python benchmarks/napari_latency.py --fp32 runs/compare/fp32 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import napari  # noqa: E402

from qmedsam.data.cases import read_case  # noqa: E402
from qmedsam.inference.machine import cpu_name  # noqa: E402
from qmedsam.napari.io import demo_dir  # noqa: E402
from qmedsam.napari.layers import box_rectangle  # noqa: E402
from qmedsam.napari.widget import SegmentWidget  # noqa: E402


def _draw(widget: SegmentWidget, boxes) -> list[float]:
    shown = []
    for box in boxes:
        widget.boxes_layer.add_rectangles([box_rectangle(box)])
        widget.wait_until_idle()
        shown.append(widget.timings[-1].shown_ms)
    return shown


def _click(viewer, widget: SegmentWidget, x: float, y: float, exclude: bool, z: int | None = None) -> float:
    """A mouse click at image pixel (x, y) (of slice z) through napari's canvas handlers, as a user's (Shift:
    exclude)."""
    from vispy.app.canvas import MouseEvent

    widget.clicks_button.click()
    if z is not None:
        viewer.dims.set_current_step(0, z)
    world = widget.image_layer.data_to_world((y, x) if z is None else (z, y, x))
    canvas = viewer.window._qt_viewer.canvas
    position = (canvas.view.transform * canvas.view.scene.transform).map([world[-1], world[-2]])[:2]
    modifiers = ("Shift",) if exclude else ()
    canvas._on_mouse_press(MouseEvent("mouse_press", pos=position, modifiers=modifiers, button=1))
    canvas._on_mouse_release(MouseEvent("mouse_release", pos=position, modifiers=modifiers, button=1))
    widget.wait_until_idle()
    return widget.timings[-1].shown_ms


def _clicks(viewer, widget: SegmentWidget, box, z: int | None = None) -> list[float]:
    """Five clicks on the first box's object (on slice z of a volume), alternately include and exclude, inside
    its box."""
    widget.boxes_layer.selected_data = {0}
    x0, y0, x1, y1 = (float(v) for v in box)
    spots = [(0.5, 0.5), (0.15, 0.15), (0.6, 0.4), (0.85, 0.85), (0.4, 0.6)]
    return [
        _click(viewer, widget, x0 + fx * (x1 - x0), y0 + fy * (y1 - y0), exclude=i % 2 == 1, z=z)
        for i, (fx, fy) in enumerate(spots)
    ]


def measure(model: str, cases: Path, later: int) -> dict[str, float]:
    viewer = napari.Viewer(show=False)
    widget = SegmentWidget(viewer)
    widget.set_model(model)
    ct = read_case(cases / "2D_CT_TotalSeg_0001.npz")
    micro = read_case(cases / "2D_Microscopy_DSB2018_0001.npz")
    volume = read_case(cases / "3D_CT_TotalSeg_0001.npz")
    viewer.add_image(ct.image, name="ct", rgb=True)
    first_after_model = _draw(widget, ct.boxes[:1])[0]
    viewer.add_image(micro.image, name="micro", rgb=True)
    widget.image_combo.setCurrentText("micro")
    shown = _draw(widget, micro.boxes[: later + 1])
    takes_clicks = getattr(widget._segmenter.engine, "takes_clicks", True)
    clicked = _clicks(viewer, widget, micro.boxes[0]) if takes_clicks else [float("nan")]
    viewer.add_image(volume.image, name="volume")
    widget.image_combo.setCurrentText("volume")
    widget.z_from.setValue(0)
    widget.z_to.setValue(volume.image.shape[0] - 1)
    box_3d = volume.boxes[0].copy()
    box_3d[2], box_3d[5] = 0, volume.image.shape[0] - 1
    shown_3d = _draw(widget, [box_3d, box_3d + [4, 4, 0, -4, -4, 0]])
    middle = volume.image.shape[0] // 2
    clicked_3d = _clicks(viewer, widget, box_3d[[0, 1, 3, 4]], z=middle) if takes_clicks else [float("nan")]
    viewer.close()
    return {
        "first box after choosing the model (ms)": first_after_model,
        "first box on a new 512x512 image (ms)": shown[0],
        f"later boxes on it, median of {later} (ms)": statistics.median(shown[1:]),
        "a click on a drawn box, median of 5 (ms)": statistics.median(clicked),
        f"3D box over {volume.image.shape[0]} slices, first (ms)": shown_3d[0],
        "3D box, second on the same slices (ms)": shown_3d[1],
        f"a click on the 3D box ({volume.image.shape[0]} slices), median of 5 (ms)": statistics.median(clicked_3d),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", default="fp32", help="fp32 model: 'fp32' (exported on first use) or a folder")
    parser.add_argument("--later", type=int, default=10, help="later boxes to time on the 2D image")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cases = demo_dir() / "cases"
    results = {name: measure(model, cases, args.later) for name, model in (("int8", "int8"), ("fp32", args.fp32))}
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores\n")
    print("| | int8 | fp32 | fp32 / int8 |\n|---|---|---|---|")
    for key in results["int8"]:
        int8, fp32 = results["int8"][key], results["fp32"][key]
        print(f"| {key} | {int8:.0f} | {fp32:.0f} | {fp32 / int8:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "results": results}, indent=2))


if __name__ == "__main__":
    main()
