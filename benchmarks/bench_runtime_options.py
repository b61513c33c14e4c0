"""Runtime options issue 10 asked to try, measured side by side in one run on the shipped int8 model:

1. Fixed-shape decoders: the decoder IR reshaped to a static box count vs the dynamic one, ms per call at
   1, 4 and 16 boxes (paired, alternating), the largest logit difference, and what compiling one extra
   static shape costs a process (cold: empty model cache; warm: cache filled).
2. Encoder throughput: one stream with 2 threads, slices one after another (what predict does) vs two
   streams of 1 thread with two slices in flight (`AsyncInferQueue`), ms per slice.

Run with nothing else on the machine:  .venv/bin/python benchmarks/bench_runtime_options.py [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

from qmedsam.engines import resolve_model_dir
from qmedsam.inference.machine import machine_line, median_ms
from qmedsam.inference.ov_core import shared_core
from qmedsam.inference.precision import compile_config

THREADS = 2


def latency_config(cache: str) -> dict[str, object]:
    """The settings `qmedsam predict` compiles with (f32 hint, LATENCY, model cache), at THREADS threads."""
    return compile_config("f32", Path(cache), THREADS)


def decoder_feed(boxes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    box = np.array([[[30.0, 40.0, 150.0, 200.0]]], np.float32)
    return {
        "image_embedding": rng.standard_normal((1, 256, 64, 64), dtype=np.float32),
        "boxes": np.tile(box, (boxes, 1, 1)),
    }


def static_decoder(core: ov.Core, model_dir: Path, boxes: int, config: dict) -> ov.CompiledModel:
    model = core.read_model(str(model_dir / "decoder.xml"))
    model.reshape({"boxes": [boxes, 1, 4]})
    return core.compile_model(model, "CPU", config)


def fixed_shapes(core: ov.Core, model_dir: Path, repeats: int, scratch: str) -> None:
    dynamic = core.compile_model(str(model_dir / "decoder.xml"), "CPU", latency_config(scratch)).create_infer_request()
    print("decoder, dynamic box count vs static (median ms, paired in one run):")
    for boxes in (1, 4, 16):
        fixed = static_decoder(core, model_dir, boxes, latency_config(scratch)).create_infer_request()
        feed = decoder_feed(boxes)
        dyn_ms = median_ms(lambda: dynamic.infer(feed), repeats)  # noqa: B023 (called in this iteration)
        fix_ms = median_ms(lambda: fixed.infer(feed), repeats)  # noqa: B023
        diff = np.abs(dynamic.infer(feed)[0] - fixed.infer(feed)[0]).max()
        ratio = dyn_ms / fix_ms
        print(f"  {boxes:2d} boxes: dynamic {dyn_ms:7.1f} static {fix_ms:7.1f} ({ratio:.2f}x, max |dlogit| {diff:.3f})")
    with tempfile.TemporaryDirectory() as cache:
        for state in ("cold", "warm"):
            started = time.perf_counter()
            static_decoder(core, model_dir, 3, latency_config(cache))
            print(f"  compiling one more static shape, {state} cache: {time.perf_counter() - started:.2f} s")


def encoder_streams(core: ov.Core, model_dir: Path, repeats: int, scratch: str) -> None:
    images = [np.random.default_rng(i).random((1, 3, 256, 256), dtype=np.float32) for i in range(2)]
    latency = core.compile_model(str(model_dir / "encoder.xml"), "CPU", latency_config(scratch)).create_infer_request()
    two_streams = {**latency_config(scratch), "NUM_STREAMS": 2}
    del two_streams["PERFORMANCE_HINT"]  # explicit streams instead of the LATENCY hint's one
    streams = core.compile_model(str(model_dir / "encoder.xml"), "CPU", two_streams)
    queue = ov.AsyncInferQueue(streams, 2)

    def sequential() -> None:
        for image in images:
            latency.infer({0: image})

    def overlapped() -> None:
        for image in images:
            queue.start_async({0: image})
        queue.wait_all()

    print("encoder, ms per slice (median of pairs):")
    for round_ in range(3):
        seq_ms = median_ms(sequential, repeats) / 2
        par_ms = median_ms(overlapped, repeats) / 2
        print(f"  round {round_ + 1}: 1 stream x {THREADS} threads {seq_ms:6.1f}   2 streams x 1 thread {par_ms:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="int8", help="'int8' (shipped), 'fp32' or a model folder")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    print(machine_line())
    print(f"model {model_dir}, OpenVINO {ov.__version__}, f32 hint, {THREADS} threads")
    core = shared_core()
    with tempfile.TemporaryDirectory() as scratch:
        fixed_shapes(core, model_dir, args.repeats, scratch)
        encoder_streams(core, model_dir, args.repeats, scratch)


if __name__ == "__main__":
    main()
