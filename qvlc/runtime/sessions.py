"""Sessions for qvlc graphs: ONNX Runtime with the CPU options chosen by measurement, or TVM (``validate.runtimes``)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from qvlc.precision import Runtime


def session_options(weights_dir: Path | None = None) -> ort.SessionOptions:
    """ONNX Runtime CPU options for every qvlc graph, chosen by measurement (2B, fp16, 2 cores). The CPU provider
    runs fp16 MatMuls in fp32 and keeps fp32 casts of the weights; on top of that:

    - weight prepacking off: it keeps yet another packed copy (visual session 6.5 → 3.0 GB; LLM prefill
      7.6 → 7.2 GB);
    - memory pattern off: with it the arena grows with the prompt length, and a second visual call allocated a
      fresh block for the whole plan (visual peak ~13 → 8.9 GB; calls also ran faster, 45 s vs 57 s);
    - graph optimizations off (0.2): constant folding is what turns the fp16 weights into resident fp32 copies
      (the CPU provider casts fp16 MatMuls to fp32). Without it the casts run per call on one weight at a time
      and the session reads the weights file as it goes: 2B prefill at S = 2048 peaks at 5.1 GiB instead of
      8.1 GiB in a memory cgroup, at the same speed (40.7 vs 41.0 s per call); the Qwen2.5-VL-7B visual graph
      at N = 5120 is attention-bound either way (8.2 vs 8.5 GiB, 86 vs 100 s). Measured with
      `../shared/tools/memcap 24 python <script>` (README, issue notes);
    - CPU arena off (0.2): freed activations go back to the OS instead of staying in ORT's arena. With it, the 2B
      LLM validation at S = 2048 was OOM-killed in an 8 GiB cgroup when the prefill sessions gave way to the
      decode session; without it the same run completes (anon memory ≤ 4.1 GiB in validation; prefill calls
      measured 43–51 s instead of 38–41 s).
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_mem_pattern = False
    if weights_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return so


def open_session(model: str | bytes | Path, weights_dir: Path | None = None,
                 runtime: Runtime = Runtime.ONNXRUNTIME):
    """A CPU session on a graph file (or serialized graph whose external weights live in ``weights_dir``): ONNX
    Runtime's, or TVM's behind the same ``run``/``get_inputs``/``get_outputs`` (``qvlc.runtime.tvm_session``)."""
    if runtime == Runtime.TVM:
        from qvlc.runtime.tvm_session import TvmSession

        return TvmSession(model, weights_dir)
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, session_options(weights_dir),
                                providers=["CPUExecutionProvider"])
