"""One way to get an engine: `load_engine(model, engine=..., precision=..., threads=...)`, used by the CLI,
`Segmenter`, napari and the benchmarks (like segment-anything's model registry).

`model` names a model: None or "int8" (shipped in the package), "fp32" (the pretrained weights, exported once
into the user cache: that needs PyTorch, so this module sits above `export`) or a model folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qmedsam.errors import UserFacingError
from qmedsam.export.fp32 import export_float, pretrained_source
from qmedsam.inference.model_dir import default_model_dir, shipped_int8_model_dir
from qmedsam.inference.runtime import Engine, OpenVINOEngine, TorchEngine

log = logging.getLogger(__name__)


ModelChoice = str | os.PathLike | None
"""None (the default model), "fp32", "int8", or a model directory."""


def resolve_model_dir(model: ModelChoice) -> Path:
    """None or "int8" -> the int8 model shipped in the package (the default of `qmedsam predict`: no PyTorch
    needed); "fp32" -> the pretrained fp32 IR (built once into the user cache); anything else -> a model
    directory."""
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


ENGINE_KINDS = ("openvino", "torch")


def load_engine(
    model: ModelChoice = None,
    *,
    engine: str = "openvino",
    precision: str = "auto",
    threads: int | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> Engine:
    """The engine every face uses: OpenVINO on a model (`resolve_model_dir`) with the precision rule `precision`
    (auto | f32 | bf16), or the PyTorch reference (`engine="torch"`, the pretrained weights or `checkpoint`)."""
    if engine not in ENGINE_KINDS:
        raise UserFacingError(f"engine must be one of {ENGINE_KINDS}, got {engine!r}")
    if engine == "torch":
        if model is not None:
            raise UserFacingError("-m is an OpenVINO model directory; with --engine torch use --checkpoint")
        from qmedsam.model.litemedsam import load_pretrained_litemedsam

        return TorchEngine(load_pretrained_litemedsam(checkpoint), threads)
    if checkpoint is not None:
        raise UserFacingError("--checkpoint applies to --engine torch; export it with `qmedsam export` for OpenVINO")
    return OpenVINOEngine(resolve_model_dir(model), precision=precision, num_threads=threads)
