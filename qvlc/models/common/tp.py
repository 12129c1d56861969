"""Tensor parallelism declared on the weights: which weight is split along which dimension, where the reductions
are, and which slice each rank holds.

A family declares a ``TpPlan``; the deployment modules build their Linears through ``shard_linear`` from it, and
the manifest's split points and reduction list are generated from the same plan — one declaration, three uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from qvlc.models.common.dims import TextDims
    from qvlc.models.common.layers import Linear


class Axis(str, Enum):
    """What a split weight is split by (the manifest's key for the rank's range)."""

    HEADS = "heads"
    KV_HEADS = "kv_heads"
    FEATURES = "features"
    VOCAB = "tokens"


@dataclass(frozen=True)
class Shard:
    """One split weight: ``module`` is its path inside a decoder layer (or ``lm_head``); ``split`` is ``output``
    (rows of the HF weight, and the bias), ``input`` (columns; the bias stays whole) or ``vocab`` (output rows
    by token); ``reduce_after`` puts an AllReduce(sum) on the module's output."""

    module: str
    split: str
    axis: Axis
    bias: bool = False
    reduce_after: bool = False


@dataclass(frozen=True)
class TpPlan:
    layer: tuple[Shard, ...]  # per decoder layer
    head: Shard  # the output projection

    def shard(self, module: str) -> Shard:
        for s in (*self.layer, self.head):
            if s.module == module:
                return s
        raise KeyError(f"the TP plan declares no weight {module!r}")  # a bug in a family's modules

    @property
    def reductions(self) -> list[str]:
        return [s.module for s in self.layer if s.reduce_after]


@dataclass(frozen=True)
class RankLayout:
    """Which slice of every split weight one tensor-parallel rank holds (in units of its axis)."""

    tp: int
    rank: int
    heads: int  # query heads on this rank
    head_start: int
    kv_heads: int  # kv heads on this rank (1 when kv heads are replicated)
    kv_head_start: int
    intermediate: int
    intermediate_start: int
    vocab: int
    vocab_start: int

    def range(self, axis: Axis) -> tuple[int, int]:
        """(start, length) of this rank's slice along ``axis``."""
        return {Axis.HEADS: (self.head_start, self.heads), Axis.KV_HEADS: (self.kv_head_start, self.kv_heads),
                Axis.FEATURES: (self.intermediate_start, self.intermediate),
                Axis.VOCAB: (self.vocab_start, self.vocab)}[axis]

    def split_points(self, plan: TpPlan, layers: int, prefix: str = "stack") -> list[dict]:
        """Every split weight (by its initializer name in the rank graphs) and every reduction point."""
        pts: list[dict] = []
        for i in range(layers):
            for s in plan.layer:
                pts.append(self._point(s, f"{prefix}.layers.{i}.{s.module}"))
        pts.append(self._point(plan.head, f"{prefix}.{plan.head.module}"))
        return pts

    def _point(self, s: Shard, name: str) -> dict:
        start, length = self.range(s.axis)
        p: dict = {"initializer": f"{name}.weight_t"}
        if s.bias:
            p["bias"] = f"{name}.bias"
        p["split"] = s.split
        p[s.axis.value] = [start, start + length]
        if s.reduce_after:
            p["then"] = "AllReduce(sum)"
        return p


def rank_layout(text: "TextDims", tp: int, rank: int) -> RankLayout:
    """The slices of rank ``rank`` out of ``tp``. The config checks guarantee everything divides evenly."""
    heads = text.heads // tp
    if text.kv_heads >= tp:
        kv = text.kv_heads // tp
        kv_start = rank * kv
    else:  # fewer kv heads than ranks: each rank keeps the one kv head its query heads read
        kv = 1
        kv_start = rank * text.kv_heads // tp
    inter = text.intermediate // tp
    vocab = text.vocab // tp
    return RankLayout(tp, rank, heads, rank * heads, kv, kv_start, inter, rank * inter, vocab, rank * vocab)


def tp_problems(tp: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> list[str]:
    """Why ``tp`` cannot split this model evenly (empty when it can)."""
    problems = []
    if heads % tp:
        problems.append(f"{heads} attention heads are not divisible by {tp}")
    if intermediate % tp:
        problems.append(f"intermediate_size {intermediate} is not divisible by {tp}")
    if vocab % tp:
        problems.append(f"vocab_size {vocab} is not divisible by {tp}")
    if kv_heads >= tp and kv_heads % tp:
        problems.append(f"{kv_heads} kv heads are not divisible by {tp}")
    if kv_heads < tp and tp % kv_heads:
        problems.append(f"{kv_heads} kv heads cannot be replicated evenly over {tp} ranks")
    return problems


def valid_tp_values(heads: int, kv_heads: int, intermediate: int, vocab: int, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if not tp_problems(t, heads, kv_heads, intermediate, vocab)]


def shard_linear(hf, shard: Shard, layout: RankLayout, unit: int, dtype: "torch.dtype") -> "Linear":
    """This rank's slice of the Hugging Face Linear ``hf`` as declared by ``shard`` (``unit``: features per unit
    of the axis, e.g. head_dim for heads)."""
    from qvlc.models.common.layers import Linear, take

    start, length = layout.range(shard.axis)
    start, length = start * unit, length * unit
    dim = 1 if shard.split == "input" else 0
    bias = None
    hf_bias = getattr(hf, "bias", None)
    if hf_bias is not None:
        bias = take(hf_bias, 0, start, length, dtype) if dim == 0 else take(hf_bias, 0, 0, hf_bias.shape[0], dtype)
    return Linear(take(hf.weight, dim, start, length, dtype), bias)
