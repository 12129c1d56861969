"""The host side of the KV cache: one rank's cache is the past inputs of the decode/chunk graphs, by name —
``past_key_values`` [L,2,1,kvH,C-1,D] in the graph dtype, or int8 with ``past_kv_scales`` [L,2,1,kvH,C-1] fp32
(``export.kv_cache: int8``). Both carry the position on axis 4, so one slice writes a call's outputs into either."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qvlc.artifact.spec import LlmSpec
from qvlc.precision import KvCache

KV, SCALES = "key_values", "kv_scales"  # the names after past_ / present_

Cache = dict[str, np.ndarray]


def empty_cache(spec: LlmSpec) -> Cache:
    """One rank's empty cache for C - 1 positions."""
    shape = (spec.layers, 2, 1, spec.kv_heads_per_rank, spec.max_context - 1, spec.head_dim)
    if KvCache(spec.kv_cache) is KvCache.INT8:
        return {f"past_{KV}": np.zeros(shape, np.int8), f"past_{SCALES}": np.zeros(shape[:5], np.float32)}
    return {f"past_{KV}": np.zeros(shape, spec.dtype.numpy)}


def write(cache: Cache, outs: Mapping[str, np.ndarray], slot: int) -> int:
    """A call's present_* outputs into ``cache`` from position ``slot``; returns how many positions they hold."""
    t = 0
    for name in (KV, SCALES):
        if f"present_{name}" in outs:
            new = outs[f"present_{name}"]
            t = new.shape[4]
            cache[f"past_{name}"][:, :, :, :, slot:slot + t] = new
    return t


def kv_values(parts: Mapping[str, np.ndarray], kind: str = "past") -> np.ndarray:
    """The K/V values attention reads, [L,2,1,kvH,P,D]: ``kind``_key_values itself (graph dtype), or its integers
    times their scales (fp32) for an int8 cache."""
    kv = parts[f"{kind}_{KV}"]
    scales = parts.get(f"{kind}_{SCALES}")
    return kv if scales is None else kv.astype(np.float32) * scales[..., None]


def sequence_bytes(spec: LlmSpec) -> int:
    """The bytes of one sequence's cache (C - 1 positions) over every rank: what a decode call reads as past."""
    rows = spec.layers * 2 * spec.kv_heads_per_rank * (spec.max_context - 1) * spec.tp
    if KvCache(spec.kv_cache) is KvCache.INT8:
        return rows * (spec.head_dim + 4)  # int8 values and one fp32 scale per row
    return rows * spec.head_dim * spec.dtype.bytes


@dataclass
class KvState:
    """The host side of a sequence: per-rank KV caches (the graphs' past inputs by name), the past mask, the next
    free slot, and the slots its prompt took (S after the prefill graph; whole chunks of T after the chunk graph):
    decode step k writes slot ``window + k``."""

    kv: list[Cache]
    past_mask: np.ndarray
    slot: int
    window: int = 0


def copy_state(state: KvState) -> KvState:
    return KvState([{k: a.copy() for k, a in cache.items()} for cache in state.kv], state.past_mask.copy(),
                   state.slot, state.window)
