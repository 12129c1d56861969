"""The int8 KV cache rule (``export.kv_cache: int8``), in one place: the graphs and the oracle both call it.

For every layer, K or V, kv head and position: ``amax = max(max_d |x_d|, 1e-6)`` over the head dimension,
``scale = amax / 127`` (fp32), ``q = clip(round_half_to_even(x / scale), -127, 127)`` as int8, the fp32 scale
stored beside it. Attention reads ``q * scale`` (computed in fp32, then cast to the attention's dtype) for every
position, the ones written in the same call included, so a token's result does not depend on which call wrote its
keys. Keys are quantized after rotary (and after Qwen3's q/k norms): what the cache holds is what attention reads.
"""

from __future__ import annotations

import torch

from qvlc.precision import KvCache

KV_QMAX = 127  # symmetric: -128 is never written, so q and -q both exist
KV_MIN_AMAX = 1e-6  # an all-zero row gets a finite scale (its integers are 0)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) → (int8 [..., D], fp32 scale [...]). ``torch.round`` rounds half to even, as
    ONNX ``Round`` does."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(KV_MIN_AMAX) / KV_QMAX
    q = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -KV_QMAX, KV_QMAX).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The values attention reads, fp32: ``q * scale``."""
    return q.float() * scale.unsqueeze(-1)


def fake_quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """x through the cache and back, in x's dtype: what attention reads where x was written."""
    return dequantize_kv(*quantize_kv(x)).to(x.dtype)


class KvStore:
    """How a graph module keeps the K and V it computes. ``fp``: one tensor in the graph dtype. ``int8``: the integers
    and their scales. ``pack`` gives the stored parts and what attention computes with; ``present`` stacks every
    layer's parts into the graph outputs and ``past`` reads one layer's K and V (fp32 for int8; attention casts them)
    from the graph's past inputs."""

    def __init__(self, kind: KvCache, dtype: torch.dtype) -> None:
        self.int8, self.dtype = KvCache(kind) is KvCache.INT8, dtype

    def pack(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(the parts the cache stores, what attention reads in this call) for K or V ``x`` [1,kvH,T,D]. ``fp``
        attention reads ``x`` itself (in an fp32 island: before its rounding to the graph dtype), as before."""
        if not self.int8:
            return (x.to(self.dtype),), x
        q, scale = quantize_kv(x)
        return (q, scale), dequantize_kv(q, scale).to(x.dtype)

    def present(self, layers: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]) -> tuple:
        """[(K parts, V parts)] per layer → present_key_values [L,2,1,kvH,T,D] (and present_kv_scales
        [L,2,1,kvH,T])."""
        return tuple(torch.stack([torch.stack([k[j], v[j]]) for k, v in layers]) for j in range(2 if self.int8 else 1))

    def past(self, past: tuple[torch.Tensor, ...], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s past K and V from past_key_values [L,2,1,kvH,P,D] (and past_kv_scales [L,2,1,kvH,P])."""
        if self.int8:
            kv, scales = past
            return dequantize_kv(kv[i, 0], scales[i, 0]), dequantize_kv(kv[i, 1], scales[i, 1])
        return past[0][i, 0], past[0][i, 1]
