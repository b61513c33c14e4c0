"""A model folder (`qmedsam export`'s output): what makes one, how to read its meta.json, where the shipped
int8 model and the cached fp32 model live. Export writes this contract; engines read it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qmedsam.errors import UserFacingError
from qmedsam.files import default_cache_root, sha256_file
from qmedsam.model.weights import WEIGHTS_SHA256
from qmedsam.version import __version__

MODEL_FORMAT = "qmedsam-openvino"


CLICK_DECODER_FILES = ("click_decoder.xml", "click_decoder.bin")
"""Optional: a decoder for boxes *with clicks* beside the box decoder. The box decoder then stays exactly the one
the folder had (same masks, same speed, what the C++ predictor runs), and only a click reaches this one."""

MODEL_FILES = frozenset({"encoder.xml", "encoder.bin", "decoder.xml", "decoder.bin", "meta.json", *CLICK_DECODER_FILES})


def is_model_dir(path: Path) -> bool:
    """A folder `qmedsam export` made: its meta.json is a JSON object with format 'qmedsam-openvino'."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT


def default_model_dir() -> Path:
    """The fp32 IR built from the pretrained weights, built once into the user cache."""
    return default_cache_root() / "models" / f"litemedsam-fp32-{WEIGHTS_SHA256[:12]}-v{__version__}"


SHIPPED_INT8_DIR = Path(__file__).resolve().parent.parent / "models" / "int8"
"""The int8 OpenVINO model shipped inside the package (`src/qmedsam/models/int8`)."""


def shipped_int8_model_dir() -> Path:
    """The int8 model directory shipped with the package; a clear error if this install has none."""
    if not (SHIPPED_INT8_DIR / "meta.json").is_file():
        raise UserFacingError(
            f"{SHIPPED_INT8_DIR}: this install ships no int8 model; "
            "use 'fp32' or a model directory from `qmedsam export`"
        )
    return SHIPPED_INT8_DIR


def read_model_meta(model_dir: Path) -> dict:
    """meta.json of a model directory, validated enough to give a clear error."""
    model_dir = Path(model_dir)
    for name in ("encoder.xml", "encoder.bin", "decoder.xml", "decoder.bin", "meta.json"):
        if not (model_dir / name).is_file():
            raise UserFacingError(
                f"{model_dir}: not a qmedsam model directory (missing {name}); create one with `qmedsam export`"
            )
    try:
        meta = json.loads((model_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserFacingError(f"{model_dir / 'meta.json'}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("image_size", 256) != 256:
        raise UserFacingError(f"{model_dir / 'meta.json'}: expected a JSON object with image_size 256")
    return meta


def click_decoder_path(model_dir: Path) -> Path | None:
    """The folder's click decoder (`click_decoder.xml` + `.bin`), None without one; half of one is an error."""
    present = [name for name in CLICK_DECODER_FILES if (Path(model_dir) / name).is_file()]
    if not present:
        return None
    if len(present) != len(CLICK_DECODER_FILES):
        missing = next(name for name in CLICK_DECODER_FILES if name not in present)
        raise UserFacingError(f"{model_dir}: has {present[0]} but not {missing}; re-assemble or remove both")
    return Path(model_dir) / CLICK_DECODER_FILES[0]


def encoder_sha256(model_dir: Path) -> str:
    """The identity of a folder's encoder IR (both files): what a decoder trained on its embeddings records."""
    digest = hashlib.sha256()
    for name in ("encoder.xml", "encoder.bin"):
        digest.update(sha256_file(Path(model_dir) / name).encode())
    return digest.hexdigest()
