"""Deployment module for the Qwen3-VL vision tower: the ``visual`` graph with its DeepStack outputs.

What transformers' ``Qwen3VLVisionModel`` computes, with the choices of the Qwen2-VL module (rotary cos/sin and a
dense per-frame mask as inputs, the Conv3d patch embedding as a MatMul — here with its bias) and:

- the learned position table (``pos_embed``, side x side rows) is gathered in the graph with the host's four
  indices and bilinear weights per patch (``pos_idx`` int64 [4, N], ``pos_weight`` [4, N]:
  ``qvlc.host.pos_table``), summed in transformers' order and added to the patch embedding;
- LayerNorm blocks with a plain MLP (``linear_fc1`` → GELU-tanh → ``linear_fc2``);
- the merger: LayerNorm over the block width, 2 x 2 merge, ``linear_fc1`` → GELU → ``linear_fc2``; each DeepStack
  merger (after the blocks in ``deepstack_visual_indexes``) merges first, then its LayerNorm over the merged width;
- outputs ``image_embeds_*`` then ``deepstack_embeds_{j}_*``, each embedding chunked by ``chunk_width``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvlc.models.common.dims import VisionDims
from qvlc.models.common.family import chunk_widths
from qvlc.models.common.islands import DEEPSTACK, VISION, Islands
from qvlc.models.common.layers import LayerNorm, Linear, param
from qvlc.models.common.vision import VisionBlock, edge_dtypes


class Merger(nn.Module):
    """``norm`` then 2 x 2 merge (or, ``postshuffle``: merge then ``norm`` over the merged width), then
    ``linear_fc1`` → GELU → ``linear_fc2`` (transformers' ``Qwen3VLVisionPatchMerger``)."""

    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype, postshuffle: bool) -> None:
        super().__init__()
        self.norm = LayerNorm(hf.norm)
        self.linear_fc1 = Linear.of(hf.linear_fc1, dtype)
        self.linear_fc2 = Linear.of(hf.linear_fc2, dtype)
        self.width, self.postshuffle = vision.embed_dim * vision.merge_unit, postshuffle

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h.reshape(-1, self.width)) if self.postshuffle else self.norm(h).reshape(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x.to(self.linear_fc1.weight_t.dtype))))


class VisualGraph(nn.Module):
    """pixel_values [N, patch_dim], attention_mask bool [1, N, N], cos/sin [N, Dv], pos_idx int64 [4, N],
    pos_weight [4, N] → image_embeds_* then deepstack_embeds_{j}_* [N / merge_unit, chunk widths]."""

    def __init__(self, hf_visual: nn.Module, vision: VisionDims, chunk_width: int, dtype: torch.dtype,
                 attention_block: int = 0, islands: Islands | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        embed_dtype, merger_dtype = edge_dtypes(islands, dtype)
        proj = hf_visual.patch_embed.proj
        self.patch_embed = Linear(param(proj.weight, embed_dtype, (vision.embed_dim, vision.patch_dim)),
                                  param(proj.bias, embed_dtype))
        self.pos_embed = param(hf_visual.pos_embed.weight, embed_dtype)
        self.blocks = nn.ModuleList(VisionBlock(b, vision, dtype, attention_block, i, islands,
                                                ("linear_fc1", "linear_fc2")) for i, b in enumerate(hf_visual.blocks))
        self.merger = Merger(hf_visual.merger, vision, merger_dtype, postshuffle=False)
        fp32 = (islands or Islands()).fp32
        self.deepstack_merger_list = nn.ModuleList(
            Merger(m, vision, torch.float32 if fp32(f"{VISION}.{DEEPSTACK}.{j}") else dtype, postshuffle=True)
            for j, m in enumerate(hf_visual.deepstack_merger_list))
        self.deepstack_after = tuple(vision.deepstack)
        self.widths = chunk_widths(vision.out_hidden, chunk_width)

    def forward(self, pixel_values, attention_mask, cos, sin, pos_idx, pos_weight):
        cos, sin = cos.float()[None], sin.float()[None]
        allowed = attention_mask.bool()
        h = self.patch_embed(pixel_values.to(self.patch_embed.weight_t.dtype))
        w = pos_weight.to(self.pos_embed.dtype)
        pos = self.pos_embed[pos_idx[0]] * w[0][:, None]
        for k in range(1, 4):  # transformers' order: ((p0 + p1) + p2) + p3
            pos = pos + self.pos_embed[pos_idx[k]] * w[k][:, None]
        h = h + pos
        deep = []
        for i, block in enumerate(self.blocks):
            h = block(h, allowed, cos, sin)
            if i in self.deepstack_after:
                deep.append(self.deepstack_merger_list[self.deepstack_after.index(i)](h))
        outs = [self.merger(h), *deep]
        return tuple(c for o in outs for c in torch.split(o.to(self.dtype), self.widths, dim=-1))
