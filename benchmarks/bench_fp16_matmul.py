"""Benchmark: one decode-sized MatMul in ONNX Runtime on this CPU, fp16 weights against fp32 — why validation's
decode phase sits far above its memory-bandwidth floor.

    .venv/bin/python benchmarks/bench_fp16_matmul.py [--k 3584] [--n 4736] [--m 1] [--calls 20]

Builds [m, k] x [k, n] MatMul graphs with the weight as an initializer, in fp16 and in fp32, and times them in
sessions with qvlc's validation options (graph optimizations off) and with basic optimizations; prints the median
milliseconds per call and the weight bytes streamed per second it implies.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(k: int, n: int, m: int, dtype: np.dtype, level) -> ort.InferenceSession:
    proto = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(dtype), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", proto, [1, m, k])],
                              [helper.make_tensor_value_info("y", proto, [1, m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3584)
    ap.add_argument("--n", type=int, default=4736)  # the 7B MLP's intermediate over 4 ranks
    ap.add_argument("--m", type=int, default=1)  # tokens: 1 for decode
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    print(f"MatMul [{args.m}, {args.k}] x [{args.k}, {args.n}], median of {args.calls} calls, "
          f"onnxruntime {ort.__version__}")
    levels = {"optimizations off (validation's sessions)": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic optimizations": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    for dtype in (np.float16, np.float32):
        for label, level in levels.items():
            s = session(args.k, args.n, args.m, dtype, level)
            x = np.random.default_rng(1).standard_normal((1, args.m, args.k)).astype(dtype)
            s.run(None, {"x": x})
            times = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            gbps = args.k * args.n * np.dtype(dtype).itemsize / (ms / 1e3) / 1e9
            print(f"  {np.dtype(dtype).name:<8} {label:<42} {ms:8.2f} ms  ({gbps:.2f} GB/s of weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
