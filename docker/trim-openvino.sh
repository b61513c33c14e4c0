#!/bin/sh
# Drop what a CPU-only reader of OpenVINO IR never loads: the GPU / NPU plugins, their kernel cache and the
# ONNX / TensorFlow / PyTorch / Paddle / GGUF front ends (about 75 MB). Usage: trim-openvino.sh OPENVINO_LIBS_DIR
set -eu
cd "$1"
rm -f libopenvino_intel_gpu_plugin.so libopenvino_intel_npu_plugin.so cache.json
for lib in libopenvino_*_frontend.so*; do
  case "$lib" in
    libopenvino_ir_frontend.so*) ;;
    *) rm -f "$lib" ;;
  esac
done
