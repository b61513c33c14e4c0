"""qmedsam: quantization-aware LiteMedSAM, exported to OpenVINO, for box-prompted masks on CPUs.

`from qmedsam import Segmenter` is the Python API (see `qmedsam.segmenter`); it is imported lazily so
`import qmedsam` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmedsam.version import __version__

if TYPE_CHECKING:
    from qmedsam.segmenter import Segmenter

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from qmedsam.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'qmedsam' has no attribute {name!r}")
