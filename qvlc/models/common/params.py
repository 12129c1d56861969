"""Parameter counts from the dims (no weights read) — what the memory estimate, the export's worker plan and the
reference model's check size — and the size below which validation also runs the unsplit tp = 1 module."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qvlc.models.common.dims import ModelDims



def text_params(dims: "ModelDims") -> int:
    t = dims.text
    per_layer = (t.hidden * t.heads * t.head_dim * 2 + t.hidden * t.kv_heads * t.head_dim * 2
                 + 3 * t.hidden * t.intermediate)
    return t.layers * per_layer + t.vocab * t.hidden  # + lm_head (the graphs hold it; embed_tokens is a .bin)


def vision_params(dims: "ModelDims") -> int:
    v = dims.vision
    mlp = (3 if v.window else 2) * v.embed_dim * v.mlp_hidden
    merged = v.embed_dim * v.merge_unit
    return v.depth * (4 * v.embed_dim**2 + mlp) + merged * merged + merged * v.out_hidden + v.patch_dim * v.embed_dim


# With tp > 1, LLM validation's tp = 1 comparison runs the unsplit deployment module in eager torch, in the
# export dtype, beside the rank sessions. It isolates a tensor-parallel error from an export error, on models whose unsplit weights are small:
# above this size it would hold the whole model in memory (7B fp16: 14 GB) and torch computes fp16 on CPU at
# ~1 GFLOP/s here (a 7B prefill at S = 2048 would take hours). Every rank's logit slice and KV heads, and the
# recombined result, are compared with the fp32 oracle either way — at the same tolerance.
UNSPLIT_MAX_BYTES = 1 << 30
