"""Deployment module for the Qwen2-VL vision tower: the ``visual`` graph of DESIGN.md section 3.

Our own small modules holding the Hugging Face parameters (views; converted only when the export dtype differs).
They compute what transformers' ``Qwen2VisionTransformerPretrainedModel`` computes for the real patches, with the
choices a static accelerator graph needs:

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
import torch.nn.functional as F
from torch import nn

from qvlc.errors import QvlcError
from qvlc.models.qwen2_vl.dims import VisionDims
from qvlc.models.qwen2_vl.llm import Linear, rotate_half

INPUT_NAMES = ("pixel_values", "attention_mask", "cos", "sin")
OUTPUT_PREFIX = "image_embeds_"
LAYER_NORM_EPS = 1e-6  # transformers hard-codes eps=1e-6 for the vision LayerNorms


def chunk_widths(out_hidden: int, chunk_width: int) -> list[int]:
    """Widths of the ``image_embeds_i`` outputs: full chunks, then the remainder (1536/640 → [640, 640, 256])."""
    if chunk_width < 1:
        raise QvlcError(f"chunk_width {chunk_width} is not positive", fix="set export.chunk_width >= 1",
                        key="export.chunk_width")
    full, rest = divmod(out_hidden, chunk_width)
    return [chunk_width] * full + ([rest] if rest else [])


def output_names(out_hidden: int, chunk_width: int) -> tuple[str, ...]:
    return tuple(f"{OUTPUT_PREFIX}{i}" for i in range(len(chunk_widths(out_hidden, chunk_width))))


def _param(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> nn.Parameter:
    """A Hugging Face parameter (optionally reshaped as a view): no copy unless the dtype differs."""
    t = t.detach()
    if shape is not None:
        t = t.view(shape)
    return nn.Parameter(t.to(dtype), requires_grad=False)


def _linear(hf: nn.Linear, dtype: torch.dtype) -> Linear:
    return Linear(_param(hf.weight, dtype), None if hf.bias is None else _param(hf.bias, dtype))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: F.gelu(x), "silu": F.silu}


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (parameters kept fp32: they are small), result in the activation dtype."""

    def __init__(self, hf: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = _param(hf.weight, torch.float32)
        self.bias = _param(hf.bias, torch.float32)
        self.eps = float(hf.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads, self.head_dim = vision.heads, vision.head_dim
        self.scale = vision.head_dim**-0.5
        self.qkv = _linear(hf.qkv, dtype)
        self.proj = _linear(hf.proj, dtype)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)  # [H, N, Dv]
        # apply_rotary_pos_emb_vision: in fp32, then back to the activation dtype. The 1/sqrt(Dv) scale is folded
        # into q here, on [H, N, Dv], instead of on the [H, N, N] scores (one N² pass less per layer).
        q = ((q.float() * cos + rotate_half(q.float()) * sin) * self.scale).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        scores = torch.matmul(q, k.transpose(1, 2))
        # where() on fp32 scores: a masked entry is exactly excluded, whatever the activation dtype.
        scores = torch.where(allowed, scores.float(), torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(n, self.heads * self.head_dim)
        return self.proj(out)


class VisionMlp(nn.Module):
    def __init__(self, hf: nn.Module, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = _linear(hf.fc1, dtype)
        self.fc2 = _linear(hf.fc2, dtype)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, hf: nn.Module, vision: VisionDims, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm1 = LayerNorm(hf.norm1)
        self.attn = VisionAttention(hf.attn, vision, dtype)
        self.norm2 = LayerNorm(hf.norm2)
        self.mlp = VisionMlp(hf.mlp, act, dtype)

    def forward(self, h, allowed, cos, sin):
        h = h + self.attn(self.norm1(h), allowed, cos, sin)
        return h + self.mlp(self.norm2(h))


class PatchMerger(nn.Module):
    """ln_q, then each merge unit of rows (2×2 neighbours, consecutive in patch order) → Linear, GELU, Linear."""

    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_q = LayerNorm(hf.ln_q)
        self.fc1 = _linear(hf.mlp[0], dtype)
        self.fc2 = _linear(hf.mlp[2], dtype)
        self.width = vision.embed_dim * vision.merge_unit

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(h).reshape(-1, self.width)
        return self.fc2(F.gelu(self.fc1(x)))


def vision_activation(hf_visual: nn.Module) -> str:
    """The vision MLP activation named in the checkpoint's vision config (Qwen2-VL: quick_gelu)."""
    act = getattr(hf_visual.config, "hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise QvlcError(f"vision_config.hidden_act {act!r} is not supported",
                        fix=f"use a checkpoint whose vision MLP uses one of {sorted(ACTIVATIONS)}",
                        key="model.checkpoint")
    return act


class VisualGraph(nn.Module):
    """pixel_values [N, patch_dim], attention_mask bool [1, N, N] (True = may attend), cos/sin [N, Dv]
    → image_embeds_0 … image_embeds_{k-1} [N / merge_unit, chunk widths] (export dtype)."""

    input_names = INPUT_NAMES

    def __init__(self, hf_visual: nn.Module, vision: VisionDims, chunk_width: int, dtype: torch.dtype) -> None:
        super().__init__()
        act = vision_activation(hf_visual)
        self.patch_dim = vision.patch_dim
        # Conv3d with kernel = stride over one patch == a MatMul with the kernel flattened as (C, T, P, P).
        w = hf_visual.patch_embed.proj.weight
        self.patch_embed = Linear(_param(w, dtype, (vision.embed_dim, vision.patch_dim)))
        self.blocks = nn.ModuleList(VisionBlock(b, vision, act, dtype) for b in hf_visual.blocks)
        self.merger = PatchMerger(hf_visual.merger, vision, dtype)
        self.widths = chunk_widths(vision.out_hidden, chunk_width)
        self.output_names = output_names(vision.out_hidden, chunk_width)
        self.dtype = dtype

    def forward(self, pixel_values, attention_mask, cos, sin):
        cos, sin = cos.float()[None], sin.float()[None]  # [1, N, Dv], broadcast over heads
        allowed = attention_mask.bool()
        h = self.patch_embed(pixel_values)
        for block in self.blocks:
            h = block(h, allowed, cos, sin)
        return tuple(torch.split(self.merger(h), self.widths, dim=-1))


def example_inputs(vision: VisionDims, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Static-shape example inputs for tracing (values do not matter, shapes and dtypes do)."""
    return (
        torch.zeros(n, vision.patch_dim, dtype=dtype),
        torch.eye(n, dtype=torch.bool)[None],
        torch.ones(n, vision.head_dim, dtype=dtype),
        torch.zeros(n, vision.head_dim, dtype=dtype),
    )
