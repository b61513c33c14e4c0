#!/bin/sh
# The challenge's convention: every case in /workspace/inputs segmented into /workspace/outputs, with the int8
# model shipped in the package (no PyTorch in the image). INPUT_DIR / OUTPUT_DIR / QMEDSAM_MODEL override the
# defaults; extra arguments go to `qmedsam predict` (e.g. --prompt-mode propagate, --threads 2).
set -eu
INPUT_DIR="${INPUT_DIR:-/workspace/inputs}"
OUTPUT_DIR="${OUTPUT_DIR:-/workspace/outputs}"
# OpenVINO's compiled-model cache must be writable by whoever runs the container (any uid).
export QMEDSAM_CACHE="${QMEDSAM_CACHE:-${TMPDIR:-/tmp}/qmedsam-cache}"
mkdir -p "$QMEDSAM_CACHE"
exec qmedsam predict -i "$INPUT_DIR" -o "$OUTPUT_DIR" -m "${QMEDSAM_MODEL:-int8}" "$@"
