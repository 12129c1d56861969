"""Benchmark: what the TVM runtime (validate.runtimes: [onnxruntime, tvm]) costs on compiled full-size graphs, next
to ONNX Runtime on the same feeds, and how far its fp16 arithmetic lands from ONNX Runtime's.

    .venv/bin/python benchmarks/bench_tvm.py ARTIFACT [--graphs decode,prefill] [--steps 3] [--prompt-len 256]

ARTIFACT is a compiled LLM or visual artifact folder (e.g. one written by bench_llm_2b.py or bench_visual.py). Each
runtime runs in its own spawned process, so the peak RSS printed is that runtime's own. LLM: one prompt of
--prompt-len random tokens through the prefill graph (if selected), then --steps decode steps fed the same tokens
on both runtimes (median per step); with prefill not selected, TVM's decode steps start from ONNX Runtime's KV.
Visual: one graph call at N patches. Prints build (session) time, call times, peak RSS, and rel L2 / cosine of
TVM's outputs against ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue as queue_module
import resource
import statistics
import time
from pathlib import Path


def _llm(folder: str, runtime: str, graphs: list[str], steps: int, prompt_len: int, start, queue) -> None:
    import numpy as np

    from qvlc.host.rope import decode_position
    from qvlc.precision import Runtime
    from qvlc.runtime.llm import LlmRuntime

    rt = LlmRuntime(Path(folder), runtime=Runtime(runtime))
    res: dict = {"runtime": runtime}
    special = {rt.spec.image_token, rt.spec.video_token, rt.spec.vision_start, rt.spec.vision_end}
    ids = np.array([t for t in range(rt.spec.vocab) if t not in special][:min(prompt_len, rt.spec.prefill_len)])
    w = rt.prompt_window(ids)
    if "prefill" in graphs or start is None:
        t0 = time.perf_counter()
        rt.prefill_graph  # noqa: B018 — opens (TVM: builds) the sessions
        res["prefill build s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res["prefill logits"] = rt.logits_of(rt.prefill(w.embeds, w.positions, w.mask))
        res["prefill call s"] = time.perf_counter() - t0
        rt.release_prefill()
        res["state"] = rt.snapshot()
    else:
        rt.restore(start)
    if "decode" in graphs:
        t0 = time.perf_counter()
        rt.decode_graph  # noqa: B018
        res["decode build s"] = time.perf_counter() - t0
        times, logits = [], []
        for step in range(steps):
            embed = rt.embed.lookup(ids[step:step + 1])[0]
            t0 = time.perf_counter()
            logits.append(rt.logits_of(rt.decode(embed, decode_position(rt.spec.prefill_len, step, w.delta))))
            times.append(time.perf_counter() - t0)
        res["decode step s (median)"] = statistics.median(times)
        res["decode logits"] = np.stack(logits)
    res["peak RSS GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    queue.put(res)


def _visual(folder: str, runtime: str, queue) -> None:
    import numpy as np

    from qvlc.precision import Runtime
    from qvlc.runtime.visual import VisualRuntime

    t0 = time.perf_counter()
    rt = VisualRuntime(Path(folder), runtime=Runtime(runtime))
    res: dict = {"runtime": runtime, "visual build s": time.perf_counter() - t0}
    s = rt.spec
    units = s.max_patches // s.merge_size**2  # a grid of merge units filling N
    a = int(units**0.5)
    grids = np.array([[1, a * s.merge_size, units // a * s.merge_size]])
    pixels = np.random.default_rng(0).standard_normal((int(grids.prod()), rt.preprocess.patch_dim)).astype(np.float32)
    t0 = time.perf_counter()
    res["visual embeddings"] = rt.run(pixels, grids)
    res["visual call s"] = time.perf_counter() - t0
    res["peak RSS GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    queue.put(res)


def _spawn(target, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            res = queue.get(timeout=5)
            break
        except queue_module.Empty:  # is the child still running?
            if not proc.is_alive():
                raise SystemExit(f"{target.__name__}{args[1:2]} failed (exit code {proc.exitcode}); see above")
    proc.join()
    return res


def _agreement(a, b) -> str:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return (f"max abs {np.abs(a - b).max():.3e} (max |onnxruntime| {np.abs(a).max():.3g}), rel L2 {rel:.3e}, "
            f"cosine {cos:.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--graphs", default="decode,prefill", help="LLM graphs to run on TVM: decode, prefill or both")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=256)
    args = ap.parse_args()
    import json

    part = json.loads((args.artifact / "manifest.json").read_text())["part"]
    graphs = args.graphs.split(",")
    if part == "visual":
        runs = [_spawn(_visual, str(args.artifact), rt) for rt in ("onnxruntime", "tvm")]
    else:
        ort = _spawn(_llm, str(args.artifact), "onnxruntime", ["prefill", "decode"], args.steps, args.prompt_len, None)
        tvm = _spawn(_llm, str(args.artifact), "tvm", graphs, args.steps, args.prompt_len,
                     None if "prefill" in graphs else ort["state"])
        runs = [ort, tvm]
    for res in runs:
        print(f"{res['runtime']}:")
        for key, value in res.items():
            if isinstance(value, float):
                print(f"  {key:<24} {value:.2f}")
    ort, tvm = runs
    for key in ("prefill logits", "decode logits", "visual embeddings"):
        if key in ort and key in tvm:
            print(f"tvm vs onnxruntime, {key}: {_agreement(ort[key], tvm[key])}")
    for key in ("prefill call s", "decode step s (median)", "visual call s"):
        if key in ort and key in tvm:
            print(f"tvm / onnxruntime, {key}: {tvm[key] / ort[key]:.1f}x")


if __name__ == "__main__":
    main()
