"""qmedsam: quantization-aware LiteMedSAM, exported to OpenVINO, for box-prompted masks on CPUs."""

__version__ = "0.1.0"
