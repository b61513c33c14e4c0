"""Tiny stand-in for the three timm helpers the vendored LiteMedSAM reference imports (tests only)."""
