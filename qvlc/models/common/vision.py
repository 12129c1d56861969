"""Vision-tower building blocks the Qwen-VL families share: rotary attention under a dense mask, the Conv3d
patch embedding as a MatMul, the chunked output, and the visual graph's signature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvlc.artifact.signature import GraphSig, TensorSig
from qvlc.artifact.spec import VisualSpec
from qvlc.errors import QvlcError
from qvlc.models.common.dims import VisionDims
from qvlc.models.common.islands import VISION, Islands
from qvlc.models.common.layers import ACTIVATIONS, LayerNorm, Linear, param, rotate_half


class VisionAttention(nn.Module):
    """qkv → rotary (fp32) → scores under a bool mask (fp32 softmax) → proj. x [N, C], allowed bool [1, N, N].

    ``block`` > 0 computes the attention ``block`` query rows at a time (each row's softmax is over all N keys, so
    the result is the same): the [heads, N, N] fp32 scores never exist at once — at N = 5120 with 16 heads they
    are 1.7 GB per tensor, several times over in a runtime's softmax chain."""

    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype, block: int = 0) -> None:
        super().__init__()
        self.block = block
        self.heads, self.head_dim = vision.heads, vision.head_dim
        self.scale = vision.head_dim**-0.5
        self.qkv = Linear.of(hf.qkv, dtype)
        self.proj = Linear.of(hf.proj, dtype)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)  # [H, N, Dv]
        # apply_rotary_pos_emb_vision: in fp32, then back to the activation dtype. The 1/sqrt(Dv) scale is folded
        # into q here, on [H, N, Dv], instead of on the [H, N, N] scores (one N² pass less per layer).
        q = ((q.float() * cos + rotate_half(q.float()) * sin) * self.scale).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        rows = self.block if 0 < self.block < n else n
        blocks = []
        for a in range(0, n, rows):
            b = min(rows, n - a)
            scores = torch.matmul(q[:, a:a + b], k.transpose(1, 2))
            # where() on fp32 scores: a masked entry is exactly excluded, whatever the activation dtype.
            scores = torch.where(allowed[:, a:a + b], scores.float(), torch.finfo(torch.float32).min)
            blocks.append(torch.matmul(torch.softmax(scores, dim=-1).to(x.dtype), v))
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return self.proj(out.transpose(0, 1).reshape(n, self.heads * self.head_dim))


class VisionBlockBase(nn.Module):
    """A vision block: ``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``. The families build ``norm1``, ``attn``,
    ``norm2``, ``mlp`` with the dtypes ``_dtypes`` chose: with fp32 islands (``Islands``) the attention and/or
    MLP compute in fp32 and the residual stream may be carried in fp32."""

    def _dtypes(self, index: int, islands: Islands | None, dtype: torch.dtype) -> None:
        islands, name = islands or Islands(), f"{VISION}.blocks.{index}"
        self.attn_dtype = torch.float32 if islands.fp32(f"{name}.attn") else dtype
        self.mlp_dtype = torch.float32 if islands.fp32(f"{name}.mlp") else dtype
        self.residual_dtype = torch.float32 if islands.residual_fp32(index) else dtype

    def forward(self, h, allowed, cos, sin):
        h = h.to(self.residual_dtype)  # a no-op without islands
        h = h + self.attn(self.norm1(h).to(self.attn_dtype), allowed, cos, sin).to(h.dtype)
        return h + self.mlp(self.norm2(h).to(self.mlp_dtype)).to(h.dtype)


class VisionMlp(nn.Module):
    """A plain vision MLP: first Linear → the config's activation → second Linear, under the tower's own names
    (Qwen2-VL ``fc1``/``fc2``, Qwen3-VL ``linear_fc1``/``linear_fc2``: the graph's initializers keep them)."""

    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype, names: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            setattr(self, name, Linear.of(getattr(hf, name), dtype))
        self.act = activation(vision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self, n) for n in self.names)
        return second(self.act(first(x)))


class VisionBlock(VisionBlockBase):
    """A LayerNorm block with a plain MLP (Qwen2-VL, Qwen3-VL); ``mlp_names`` are the MLP's Linears."""

    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype, attention_block: int = 0,
                 index: int = 0, islands: Islands | None = None, mlp_names: tuple[str, str] = ("fc1", "fc2")) -> None:
        super().__init__()
        self._dtypes(index, islands, dtype)
        self.norm1 = LayerNorm(hf.norm1)
        self.attn = VisionAttention(hf.attn, vision, self.attn_dtype, attention_block)
        self.norm2 = LayerNorm(hf.norm2)
        self.mlp = VisionMlp(hf.mlp, vision, self.mlp_dtype, mlp_names)


def edge_dtypes(islands: Islands | None, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(patch_embed, merger) compute dtypes under ``islands``."""
    islands = islands or Islands()
    return tuple(torch.float32 if islands.fp32(f"{VISION}.{u}") else dtype for u in ("patch_embed", "merger"))


class PatchMerger(nn.Module):
    """ln_q (LayerNorm, or the given norm), then each merge unit of rows (2×2 neighbours, consecutive in patch order) → Linear, GELU, Linear."""

    def __init__(self, hf: nn.Module, vision: VisionDims, dtype: torch.dtype, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.ln_q = norm if norm is not None else LayerNorm(hf.ln_q)
        self.fc1 = Linear.of(hf.mlp[0], dtype)
        self.fc2 = Linear.of(hf.mlp[2], dtype)
        self.width = vision.embed_dim * vision.merge_unit

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(h).reshape(-1, self.width).to(self.fc1.weight_t.dtype)
        return self.fc2(F.gelu(self.fc1(x)))


def patch_embed(hf_visual: nn.Module, vision: VisionDims, dtype: torch.dtype) -> Linear:
    """Conv3d with kernel = stride over one patch == a MatMul with the kernel flattened as (C, T, P, P)."""
    w = hf_visual.patch_embed.proj.weight
    return Linear(param(w, dtype, (vision.embed_dim, vision.patch_dim)))


def activation(vision: VisionDims):
    """The vision MLP activation named in the checkpoint's vision config."""
    if vision.hidden_act not in ACTIVATIONS:
        raise QvlcError(f"vision_config.hidden_act {vision.hidden_act!r} is not supported",
                        fix=f"use a checkpoint whose vision MLP uses one of {sorted(ACTIVATIONS)}",
                        key="model.checkpoint")
    return ACTIVATIONS[vision.hidden_act]


def visual_signature(spec: VisualSpec, masks: tuple[str, ...] = ("attention_mask",)) -> GraphSig:
    """pixel_values [N, patch_dim], one bool [1, N, N] input per mask, cos/sin [N, Dv] → image_embeds_i
    [N / merge_unit, chunk width] in the export dtype."""
    n, dt = spec.max_patches, spec.dtype.onnx_name
    inputs = (TensorSig("pixel_values", (n, spec.patch_dim), dt),
              *(TensorSig(m, (1, n, n), "bool") for m in masks),
              TensorSig("cos", (n, spec.head_dim), dt), TensorSig("sin", (n, spec.head_dim), dt))
    if spec.pos_table_side:  # the learned position table's rows and weights per patch (Qwen3-VL)
        inputs += (TensorSig("pos_idx", (4, n), "int64"), TensorSig("pos_weight", (4, n), dt))
    outputs = tuple(TensorSig(name, (spec.tokens, w), dt) for name, w in zip(spec.output_names, spec.output_widths))
    return GraphSig(inputs, outputs)
