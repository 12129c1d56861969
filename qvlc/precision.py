"""Activation precisions: their torch, NumPy and ONNX types and the parity tolerances, in one table.

A leaf module (imports no other qvlc module). A new precision or weight format is one enum member
and one row of ``_TABLE``; nothing else in qvlc keys a table by a dtype string.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """An output passes when all three hold:
    max_abs <= atol + rtol * max|ref|,  rel_l2 <= max_rel_l2,  cosine >= min_cosine."""

    atol: float
    rtol: float
    max_rel_l2: float
    min_cosine: float


class Precision(str, Enum):
    """The dtype of a graph's activations, inputs, outputs and (float) weights. A ``str`` enum: ``"fp16"`` in a
    config or manifest is ``Precision.FP16``, and compares equal to it."""

    FP32 = "fp32"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value

    @property
    def torch(self):
        import torch  # torch is not needed by the host side, which reads this module too

        return getattr(torch, _TABLE[self].torch_name)

    @property
    def numpy(self) -> np.dtype:
        """Little-endian NumPy dtype (embed_tokens.bin and graph feeds)."""
        return np.dtype(_TABLE[self].numpy_name)

    @property
    def onnx_name(self) -> str:
        """The NumPy name of the ONNX element type, as graph signatures and the manifest write it."""
        return self.numpy.name

    @property
    def tolerance(self) -> Tolerance:
        """The tolerance on ONNX Runtime (the CPU provider computes fp16 MatMuls in fp32)."""
        return _TABLE[self].tolerance

    def tolerance_on(self, runtime: Runtime, kv_cache: KvCache | str = "fp") -> Tolerance:
        """The tolerance of this precision on ``runtime``: a runtime that computes in fp16 gets its own row, and so
        does fp16 with an int8 KV cache (``_INT8_CACHE``)."""
        if self is not Precision.FP16:
            return _TABLE[self].tolerance
        if runtime in _FP16_ARITHMETIC:
            return _FP16_ARITHMETIC[runtime]
        return _INT8_CACHE if KvCache(kv_cache) is KvCache.INT8 else _TABLE[self].tolerance

    @property
    def bytes(self) -> int:
        return self.numpy.itemsize


class WeightFormat(str, Enum):
    """How Linear weights are stored in the graphs (``export.weights.format``): in the activation dtype, or as
    integers dequantized before their MatMul (``qvlc.export.quantize``)."""

    NONE = "none"  # the weights stay in export.dtype
    INT8 = "int8"  # per output channel
    INT4 = "int4"  # per group of input rows

    def __str__(self) -> str:
        return self.value

    @property
    def bits(self) -> int:
        return {WeightFormat.INT8: 8, WeightFormat.INT4: 4}[self]

    @property
    def min_cosine(self) -> float:
        """The default floor of each output's cosine against the unquantized model (``export.weights.min_cosine``
        overrides it). A floor for builds that are correct: the exactness proof catches a wrong scale or zero point;
        this one catches a quantization that lost the model. Random weights (all qvlc can measure here) carry the
        rounding noise through every layer undamped, so the figures are worst cases. Measured, the worst output:
        int8 per channel 0.9995 on the tiny model, 0.9968 (decode logits) on random Qwen2-VL-2B at S = 2048; int4
        in groups of 32 on the tiny model (two groups a row) 0.898; int4 in groups of 128 on random 2B 0.674
        (logits; KV 0.785), every greedy token still equal to the dequantized model's. 0.98 / 0.5 pass those; a
        weight whose integers are misread (nibbles swapped, zero point off) is noise, cosine near 0."""
        return {WeightFormat.INT8: 0.98, WeightFormat.INT4: 0.5}[self]


class KvCache(str, Enum):
    """How the graphs store the KV cache (``export.kv_cache``): in the activation dtype, or as int8 with one fp32
    scale per layer, K or V, kv head and position (``qvlc.models.common.kvquant`` holds the rule)."""

    FP = "fp"
    INT8 = "int8"

    def __str__(self) -> str:
        return self.value


class Runtime(str, Enum):
    """A runtime the proof runs the graphs on (``validate.runtimes``)."""

    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime, CPU provider: fp16 storage, fp32 MatMul arithmetic
    TVM = "tvm"  # Apache TVM Relax built for the host CPU (llvm): fp16 arithmetic, fp16 accumulation

    def __str__(self) -> str:
        return self.value

    @property
    def installed(self) -> bool:
        """Whether this runtime's Python package can be imported (TVM is an optional extra)."""
        import importlib.util

        return importlib.util.find_spec("tvm" if self is Runtime.TVM else "onnxruntime") is not None

    @property
    def install_hint(self) -> str:
        return 'pip install "qvlc[tvm]" (apache-tvm from PyPI)' if self is Runtime.TVM else "pip install onnxruntime"


@dataclass(frozen=True)
class _Row:
    torch_name: str
    numpy_name: str
    tolerance: Tolerance


# Why these tolerances:
# fp32 — the graph does the same arithmetic as transformers in another order (ONNX Runtime's GEMM blocking,
#   our grouped-query reshape instead of repeat_kv). Reordering error grows like sqrt(K)*eps32*|x|: measured
#   ~1e-7 on tiny models and ~1e-5 on 2B-size logits (|logit| ~ 10). 1e-4 relative leaves 10x headroom at 2B,
#   while a single weight perturbed by 1e-2 moves logits by >1e-3 relative and fails.
# fp16 — weights, activations and the KV cache are rounded to an 11-bit mantissa (eps 9.8e-4) and the error
#   compounds over layers; measured on 2B shapes: logits 1.8e-2 max abs, cosine 0.99998 against the fp32
#   oracle. rel_l2 3e-2 and cosine 0.999 pass healthy fp16 graphs with margin, and still fail a wrong slice,
#   a dropped bias or a swapped norm, which give rel_l2 of order 1.
_TABLE: dict[Precision, _Row] = {
    Precision.FP32: _Row("float32", "<f4", Tolerance(atol=1e-4, rtol=1e-4, max_rel_l2=1e-4, min_cosine=0.99999)),
    Precision.FP16: _Row("float16", "<f2", Tolerance(atol=5e-2, rtol=5e-2, max_rel_l2=3e-2, min_cosine=0.999)),
}

# fp16 on a runtime that computes in fp16 (TVM for llvm: every product, every running sum and every elementwise op is
#   rounded to fp16, MatMul sums included — stricter than an accelerator with fp32 accumulators). A K-term fp16
#   running sum carries a rounding error of about u·sqrt(K)·|partial sums| (u = 4.9e-4): ~1e-2 relative for one
#   [K = 4096] product (measured 9.4e-3), compounding through the residual stream. Measured on random Qwen2-VL-2B
#   weights against ONNX Runtime (itself ~5e-3 from the oracle; benchmarks/bench_tvm.py, README "A second
#   compiler"): LLM prefill logits rel L2 5.5e-2, cosine 0.9985; decode 4.7e-2, 0.9989; the vision tower at
#   N = 5120 (32 blocks, attention summing 5120 keys) 0.107, 0.9942. rel L2 0.2 and cosine 0.99 pass those (the
#   tower with ~2x headroom on rel L2, 1.7x on 1 - cosine); a wrong slice, a dropped bias or a swapped norm still
#   gives rel L2 of order 1, and an overflow gives inf.
_FP16_ARITHMETIC: dict[Runtime, Tolerance] = {
    Runtime.TVM: Tolerance(atol=0.5, rtol=0.15, max_rel_l2=0.2, min_cosine=0.99),
}

# fp16 with an int8 KV cache (export.kv_cache: int8), against the fp32 oracle applying the same rule. The rule rounds
#   x / scale to an integer, so wherever fp16's error moves x / scale across a midpoint the graph stores the next
#   integer and the fp32 oracle the other: a whole step (the row's amax / 127) instead of fp16's ~1e-3. fp16 K/V
#   after 28 layers are ~1e-3 of amax off, i.e. ~0.1 of a step, so a sizeable share of the cache lands one step
#   away and the difference grows toward the cache quantization's own (which 'KV cache error' reports). Measured on
#   random Qwen2-VL-7B, tp = 4, S = 2048 (docs/results.md#int8-kv-cache): decode logits rel L2 3.29e-2, cosine
#   0.99946 worst, against 6.7e-3 / 0.99998 with the fp16 cache. rel L2 6e-2 and cosine 0.998 pass those with ~2x
#   headroom; a wrong slice, a dropped bias or a swapped norm still gives rel L2 of order 1. fp32 is the rule's
#   exactness proof (its flips are rare: qvlc.validate.kv_error).
_INT8_CACHE = Tolerance(atol=5e-2, rtol=5e-2, max_rel_l2=6e-2, min_cosine=0.998)
