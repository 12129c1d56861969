"""Benchmark: one decode-sized MatMul in ONNX Runtime on this CPU, fp16 weights against fp32 — why validation's
decode phase sits far above its memory-bandwidth floor.

    .venv/bin/python benchmarks/bench_fp16_matmul.py [--k 3584] [--n 4736] [--m 1] [--calls 20]

Builds [m, k] x [k, n] MatMul graphs with the weight as an initializer, in fp16 and in fp32, and times them in
sessions with qvlc's validation options (graph optimizations off) and with basic optimizations, first with glibc's
default allocation (ORT's fp32 cast of an fp16 weight is a fresh mapping each call), then inside
``qvlc.system.malloc.heap_reuse`` (the cast buffer is reused from the heap, what validation runs its graphs in); prints
the median milliseconds per call, the weight bytes streamed per second it implies, and the fp16 ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qvlc.runtime.sessions import session_options
from qvlc.system.malloc import heap_reuse


def session(k: int, n: int, m: int, dtype: np.dtype, level) -> ort.InferenceSession:
    proto = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(dtype), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", proto, [1, m, k])],
                              [helper.make_tensor_value_info("y", proto, [1, m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = session_options()  # validation's: optimizations, prepacking, arena and memory pattern off
    if level is not None:
        so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def median_ms(s: ort.InferenceSession, m: int, k: int, dtype: np.dtype, calls: int) -> float:
    x = np.random.default_rng(1).standard_normal((1, m, k)).astype(dtype)
    s.run(None, {"x": x})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3584)
    ap.add_argument("--n", type=int, default=4736)  # the 7B MLP's intermediate over 4 ranks
    ap.add_argument("--m", type=int, default=1)  # tokens: 1 for decode
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    print(f"MatMul [{args.m}, {args.k}] x [{args.k}, {args.n}], median of {args.calls} calls, "
          f"onnxruntime {ort.__version__}")
    levels = {"validation's session options": None,
              "the same, basic optimizations on": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    fp16 = {}
    for reuse in (False, True):
        print("inside qvlc.system.malloc.heap_reuse" if reuse else "glibc's default allocation")
        with heap_reuse() if reuse else contextlib.nullcontext():
            for dtype in (np.float16, np.float32):
                for label, level in levels.items():
                    ms = median_ms(session(args.k, args.n, args.m, dtype, level), args.m, args.k, dtype, args.calls)
                    gbps = args.k * args.n * np.dtype(dtype).itemsize / (ms / 1e3) / 1e9
                    print(f"  {np.dtype(dtype).name:<8} {label:<42} {ms:8.2f} ms  ({gbps:.2f} GB/s of weights)")
                    if dtype == np.float16:
                        fp16[reuse, label] = ms
    for label in levels:
        print(f"fp16, {label}: default / heap_reuse = {fp16[False, label] / fp16[True, label]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
