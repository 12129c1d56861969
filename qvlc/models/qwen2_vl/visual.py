"""Deployment module for the Qwen2-VL vision tower: the ``visual`` graph of DESIGN.md section 3.

Our own small modules holding the Hugging Face parameters. They compute what transformers'
``Qwen2VisionTransformerPretrainedModel`` computes for the real patches, with the choices a static accelerator
graph needs:

- the Conv3d patch embedding (kernel = stride) is a MatMul on the flattened patch;
- rotary cos/sin ``[N, Dv]`` arrive as inputs (``qvlc.host.vision.vision_cos_sin``) and are applied in fp32;
- the per-frame segments are one dense ``attention_mask`` input, bool ``[1, N, N]`` (True = may attend), applied
  with ``where`` on fp32 scores; softmax runs in fp32;
- LayerNorms run in fp32 (a no-op in an fp32 graph; in fp16 it keeps the long residual stream's statistics exact);
- the merged embedding ``[N / merge_unit, out_hidden]`` leaves as ``image_embeds_0 … image_embeds_{k-1}``,
  column chunks of ``chunk_width`` with the remainder last.

Padding rows (zero patches past the real ones) attend only to themselves, so they never change a real row.
"""

from __future__ import annotations

import torch
from torch import nn

from qvlc.models.common.dims import VisionDims
from qvlc.models.common.family import chunk_widths
from qvlc.models.common.islands import Islands
from qvlc.models.common.vision import PatchMerger, VisionBlock, edge_dtypes, patch_embed


class VisualGraph(nn.Module):
    """pixel_values [N, patch_dim], attention_mask bool [1, N, N] (True = may attend), cos/sin [N, Dv]
    → image_embeds_0 … image_embeds_{k-1} [N / merge_unit, chunk widths] (export dtype)."""

    def __init__(self, hf_visual: nn.Module, vision: VisionDims, chunk_width: int, dtype: torch.dtype,
                 attention_block: int = 0, islands: Islands | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        embed_dtype, merger_dtype = edge_dtypes(islands, dtype)
        self.patch_embed = patch_embed(hf_visual, vision, embed_dtype)
        self.blocks = nn.ModuleList(VisionBlock(b, vision, dtype, attention_block, i, islands)
                                    for i, b in enumerate(hf_visual.blocks))
        self.merger = PatchMerger(hf_visual.merger, vision, merger_dtype)
        self.widths = chunk_widths(vision.out_hidden, chunk_width)

    def forward(self, pixel_values, attention_mask, cos, sin):
        cos, sin = cos.float()[None], sin.float()[None]  # [1, N, Dv], broadcast over heads
        allowed = attention_mask.bool()
        h = self.patch_embed(pixel_values.to(self.patch_embed.weight_t.dtype))
        for block in self.blocks:
            h = block(h, allowed, cos, sin)
        return tuple(torch.split(self.merger(h).to(self.dtype), self.widths, dim=-1))
