"""Deployment module for the Qwen2.5-VL vision tower: the ``visual`` graph with window attention.

What transformers 4.57.6's ``Qwen2_5_VisionTransformerPretrainedModel`` computes, as a static graph: RMSNorm
blocks with a gated SiLU MLP, an RMSNorm ``ln_q`` in the merger, and two attention patterns. The host
(``host.py``) puts the patches in window order (transformers permutes them after the patch embedding; the embedding
is row-wise, so permuting the pixel rows first is the same), permutes cos/sin alike, and passes two masks:

- ``attention_mask`` bool [1, N, N]: per frame (the blocks in ``fullatt_block_indexes``);
- ``window_attention_mask`` bool [1, N, N]: per window of ``window × window`` merged tokens (every other block).

The merged rows leave in window order; the host restores the prompt order. Padding rows attend to themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from qvlc.models.common.dims import VisionDims
from qvlc.models.common.family import chunk_widths
from qvlc.models.common.islands import Islands
from qvlc.models.common.layers import Linear, RMSNorm
from qvlc.models.common.vision import (
    PatchMerger,
    VisionAttention,
    VisionBlockBase,
    activation,
    edge_dtypes,
    patch_embed,
)

NORM_EPS = 1e-6  # transformers hard-codes eps=1e-6 for the vision RMSNorms


class GatedMlp(nn.Module):
    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear.of(hf.gate_proj, dtype)
        self.up_proj = Linear.of(hf.up_proj, dtype)
        self.down_proj = Linear.of(hf.down_proj, dtype)
        self.act = activation(vision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(VisionBlockBase):
    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype, full: bool,
                 attention_block: int = 0, index: int = 0, islands: Islands | None = None) -> None:
        super().__init__()
        self._dtypes(index, islands, dtype)
        self.full = full  # attends per frame; otherwise per window
        self.norm1 = RMSNorm(hf.norm1.weight, NORM_EPS, dtype)
        self.attn = VisionAttention(hf.attn, vision, self.attn_dtype, attention_block)
        self.norm2 = RMSNorm(hf.norm2.weight, NORM_EPS, dtype)
        self.mlp = GatedMlp(hf.mlp, vision, self.mlp_dtype)


class VisualGraph(nn.Module):
    """pixel_values [N, patch_dim] (window order), attention_mask and window_attention_mask bool [1, N, N],
    cos/sin [N, Dv] (window order) → image_embeds_0 … image_embeds_{k-1} [N / merge_unit, chunk widths]."""

    def __init__(self, hf_visual: nn.Module, vision: VisionDims, chunk_width: int, dtype: torch.dtype,
                 attention_block: int = 0, islands: Islands | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        embed_dtype, merger_dtype = edge_dtypes(islands, dtype)
        self.patch_embed = patch_embed(hf_visual, vision, embed_dtype)
        full = set(vision.fullatt_blocks)
        self.blocks = nn.ModuleList(VisionBlock(b, vision, dtype, i in full, attention_block, i, islands)
                                    for i, b in enumerate(hf_visual.blocks))
        ln_q = RMSNorm(hf_visual.merger.ln_q.weight, NORM_EPS, dtype)
        self.merger = PatchMerger(hf_visual.merger, vision, merger_dtype, norm=ln_q)
        self.widths = chunk_widths(vision.out_hidden, chunk_width)

    def forward(self, pixel_values, attention_mask, window_attention_mask, cos, sin):
        cos, sin = cos.float()[None], sin.float()[None]  # [1, N, Dv], broadcast over heads
        full, window = attention_mask.bool(), window_attention_mask.bool()
        h = self.patch_embed(pixel_values.to(self.patch_embed.weight_t.dtype))
        for block in self.blocks:
            h = block(h, full if block.full else window, cos, sin)
        return tuple(torch.split(self.merger(h).to(self.dtype), self.widths, dim=-1))


