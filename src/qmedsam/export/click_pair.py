"""Put a click decoder beside a model folder's box decoder.

Why: a click-trained decoder reads clicks well, but its masks for boxes alone are not exactly the folder's,
and its click inputs make boxes alone slower (the click map makes the dense embedding per box). Beside it, the
box decoder stays exactly as it is (the same masks for boxes alone, the same speed, what the C++ predictor
runs), and `OpenVINOEngine` sends only boxes *with clicks* to `click_decoder.xml`. The click model must have
been trained on this folder's encoder (its embeddings are what the click decoder learnt to read): the two
encoders must be byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.decoder_io import takes_clicks
from qmedsam.inference.model_dir import CLICK_DECODER_FILES, encoder_sha256, read_model_meta
from qmedsam.inference.ov_core import shared_core


def attach_click_decoder(into: Path, click_model: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy `click_model`'s decoder into `into` as click_decoder.xml/.bin and record it in `into`'s meta.json
    (`click_decoder`: its source, int8 coverage, parity, plus `record`); returns that record."""
    target_meta = read_model_meta(into)
    click_meta = read_model_meta(click_model)
    if encoder_sha256(into) != encoder_sha256(click_model):
        raise UserFacingError(
            f"{click_model}: its encoder differs from {into}'s; a click decoder reads only the encoder it was "
            "trained on (train it with encoder_model set to this folder)"
        )
    if not takes_clicks(shared_core().read_model(str(click_model / "decoder.xml"))):
        raise UserFacingError(f"{click_model / 'decoder.xml'}: takes no clicks (inputs points, point_labels)")
    for source, name in zip(("decoder.xml", "decoder.bin"), CLICK_DECODER_FILES, strict=True):
        atomic_write_bytes(into / name, (click_model / source).read_bytes())
    parity = click_meta.get("parity_vs_torch", {}).get("f32", {})
    checks = ("decoder_teacher_forced", "decoder_with_clicks")
    entry = {
        "files": list(CLICK_DECODER_FILES),
        "from": str(click_model),
        "source": click_meta.get("source"),
        "created": click_meta.get("created"),
        "int8_coverage": click_meta.get("int8_coverage", {}).get("decoder"),
        "parity_vs_torch": {key: parity[key] for key in checks if key in parity},
        **(record or {}),
    }
    target_meta["click_decoder"] = entry
    atomic_write_bytes(into / "meta.json", (json.dumps(target_meta, indent=2, sort_keys=True) + "\n").encode())
    return entry
