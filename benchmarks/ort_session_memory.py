"""ORT session options and memory: RSS after creation and after two calls of one graph, and the call time.

    ../shared/tools/memcap 24 .venv/bin/python benchmarks/ort_session_memory.py ARTIFACT_DIR base|nofold|noopt|noopt_noarena GRAPH.onnx
"""
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

folder, mode = Path(sys.argv[1]), sys.argv[2]
so = ort.SessionOptions()
so.log_severity_level = 3
so.add_session_config_entry("session.disable_prepacking", "1")
so.enable_mem_pattern = False
kw = {}
if mode == "nofold":
    kw["disabled_optimizers"] = ["ConstantFolding"]
elif mode == "noopt":
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
elif mode == "noopt_noarena":
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
elif mode == "nofold_noarena":
    kw["disabled_optimizers"] = ["ConstantFolding"]
    so.enable_cpu_mem_arena = False
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
t0 = time.perf_counter()
sess = ort.InferenceSession(str(folder / sys.argv[3]), so, providers=["CPUExecutionProvider"], **kw)
t1 = time.perf_counter()
print(f"{mode}: create {t1-t0:.1f} s, peak RSS {rss():.2f} GB", flush=True)
feeds = {}
for i in sess.get_inputs():
    shape = i.shape
    dt = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}[i.type]
    feeds[i.name] = (np.ones(shape, dt) if dt in (np.int64, np.bool_) else np.random.default_rng(0).standard_normal(shape).astype(dt) * 0.1)
for k in range(2):
    t2 = time.perf_counter()
    sess.run(None, feeds)
    print(f"{mode}: run {k} {time.perf_counter()-t2:.1f} s, peak RSS {rss():.2f} GB", flush=True)
