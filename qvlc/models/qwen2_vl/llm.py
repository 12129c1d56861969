"""Deployment modules for the Qwen2-VL language model: the prefill and decode graphs of DESIGN.md section 3.

These are our own small modules. They hold the Hugging Face parameters themselves (views, or a slice of them
for a tensor-parallel rank; converted only when the export dtype differs), never a second copy of a full model,
and they compute exactly what transformers' eager Qwen2-VL text model computes, with the choices a static
accelerator graph needs: rotary cos/sin arrive as inputs, the KV cache is one packed tensor, masks are built
from an int64 ``attention_mask`` in the graph, and every tensor-parallel reduction is an explicit ``AllReduce``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qvlc.export.allreduce import all_reduce
from qvlc.models.qwen2_vl.dims import TextDims

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- TP layout


@dataclass(frozen=True)
class RankLayout:
    """Which slice of every split weight one tensor-parallel rank holds."""

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

    def split_points(self, layers: int) -> list[dict]:
        """Every split weight (by its initializer name in the rank graphs) and every reduction point."""
        heads = [self.head_start, self.head_start + self.heads]
        kv = [self.kv_head_start, self.kv_head_start + self.kv_heads]
        inter = [self.intermediate_start, self.intermediate_start + self.intermediate]
        pts: list[dict] = []
        for i in range(layers):
            a, m = f"stack.layers.{i}.self_attn", f"stack.layers.{i}.mlp"
            pts += [
                {"initializer": f"{a}.q_proj.weight_t", "bias": f"{a}.q_proj.bias", "split": "output", "heads": heads},
                {"initializer": f"{a}.k_proj.weight_t", "bias": f"{a}.k_proj.bias", "split": "output", "kv_heads": kv},
                {"initializer": f"{a}.v_proj.weight_t", "bias": f"{a}.v_proj.bias", "split": "output", "kv_heads": kv},
                {"initializer": f"{a}.o_proj.weight_t", "split": "input", "heads": heads, "then": "AllReduce(sum)"},
                {"initializer": f"{m}.gate_proj.weight_t", "split": "output", "features": inter},
                {"initializer": f"{m}.up_proj.weight_t", "split": "output", "features": inter},
                {"initializer": f"{m}.down_proj.weight_t", "split": "input", "features": inter,
                 "then": "AllReduce(sum)"},
            ]
        pts.append({"initializer": "stack.lm_head.weight_t", "split": "vocab",
                    "tokens": [self.vocab_start, self.vocab_start + self.vocab]})
        return pts


def rank_layout(text: TextDims, tp: int, rank: int) -> RankLayout:
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


def _take(t: torch.Tensor, dim: int, start: int, length: int, dtype: torch.dtype) -> nn.Parameter:
    """A slice of a Hugging Face parameter: a view when no dtype conversion is needed, never a full copy.
    ``t`` may also be a ``lazy.LazyTensor``, which reads only the slice from the checkpoint file."""
    return nn.Parameter(t.detach().narrow(dim, start, length).to(dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight_t + bias, with ``weight_t`` the transposed view [in, out] of the HF weight [out, in].

    Holding the transpose as the parameter gives the graph a plain MatMul on a named initializer
    (``…q_proj.weight_t``); with F.linear the exporter folds the transpose into an anonymous ``val_N`` copy.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t(), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def _split_linear(hf: nn.Linear, dim: int, start: int, length: int, dtype: torch.dtype) -> Linear:
    """dim 0 splits the output features (and the bias), dim 1 the input features."""
    bias = None
    hf_bias = getattr(hf, "bias", None)
    if hf_bias is not None:
        bias = _take(hf_bias, 0, start, length, dtype) if dim == 0 else _take(hf_bias, 0, 0, hf_bias.shape[0], dtype)
    return Linear(_take(hf.weight, dim, start, length, dtype), bias)


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: normalise in fp32, scale in the activation dtype."""

    def __init__(self, weight: nn.Parameter, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _take(weight, 0, 0, weight.shape[0], dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    def __init__(self, hf: nn.Module, text: TextDims, layout: RankLayout, dtype: torch.dtype) -> None:
        super().__init__()
        d = text.head_dim
        self.heads, self.kv_heads, self.head_dim = layout.heads, layout.kv_heads, d
        self.tp = layout.tp
        self.q_proj = _split_linear(hf.q_proj, 0, layout.head_start * d, layout.heads * d, dtype)
        self.k_proj = _split_linear(hf.k_proj, 0, layout.kv_head_start * d, layout.kv_heads * d, dtype)
        self.v_proj = _split_linear(hf.v_proj, 0, layout.kv_head_start * d, layout.kv_heads * d, dtype)
        self.o_proj = _split_linear(hf.o_proj, 1, layout.head_start * d, layout.heads * d, dtype)

    def forward(self, x, cos, sin, allowed, past_k=None, past_v=None):
        b, t, _ = x.shape
        d, nh, kvh = self.head_dim, self.heads, self.kv_heads
        q = self.q_proj(x).view(b, t, nh, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, kvh, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, kvh, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        n = keys.shape[2]
        g = nh // kvh
        # Grouped-query attention without repeating K/V: the g query heads of one kv head become g*t rows.
        scores = torch.matmul(q.reshape(b, kvh, g * t, d), keys.transpose(2, 3)) * (d**-0.5)
        scores = scores.view(b, kvh, g, t, n).float()
        # where() rather than adding a bias: a fully masked (left-pad) row stays finite in fp16 too.
        scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(x.dtype).view(b, kvh, g * t, n)
        out = torch.matmul(probs, values).view(b, nh, t, d).transpose(1, 2).reshape(b, t, nh * d)
        out = self.o_proj(out)
        if self.tp > 1:
            out = all_reduce(out)
        return out, k, v


class MLP(nn.Module):
    def __init__(self, hf: nn.Module, layout: RankLayout, dtype: torch.dtype) -> None:
        super().__init__()
        a, n = layout.intermediate_start, layout.intermediate
        self.tp = layout.tp
        self.gate_proj = _split_linear(hf.gate_proj, 0, a, n, dtype)
        self.up_proj = _split_linear(hf.up_proj, 0, a, n, dtype)
        self.down_proj = _split_linear(hf.down_proj, 1, a, n, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return all_reduce(out) if self.tp > 1 else out


class DecoderLayer(nn.Module):
    def __init__(self, hf: nn.Module, text: TextDims, layout: RankLayout, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hf.input_layernorm.weight, text.rms_eps, dtype)
        self.self_attn = Attention(hf.self_attn, text, layout, dtype)
        self.post_attention_layernorm = RMSNorm(hf.post_attention_layernorm.weight, text.rms_eps, dtype)
        self.mlp = MLP(hf.mlp, layout, dtype)

    def forward(self, h, cos, sin, allowed, past_k=None, past_v=None):
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, allowed, past_k, past_v)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v


class TextStack(nn.Module):
    """The decoder layers, final norm and (this rank's slice of) lm_head, shared by prefill and decode."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Linear, text: TextDims, layout: RankLayout,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(layer, text, layout, dtype) for layer in text_model.layers)
        self.norm = RMSNorm(text_model.norm.weight, text.rms_eps, dtype)
        self.lm_head = Linear(_take(lm_head.weight, 0, layout.vocab_start, layout.vocab, dtype))

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_last)).float()


class PrefillGraph(nn.Module):
    """inputs_embeds [1,S,H], attention_mask [1,S] int64 (0 = left pad), cos/sin [1,1,S,D]
    → logits [1,1,V] (last position, fp32), present_key_values [L,2,1,kvH,S,D]."""

    input_names = ("inputs_embeds", "attention_mask", "cos", "sin")
    output_names = ("logits", "present_key_values")

    def __init__(self, stack: TextStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, inputs_embeds, attention_mask, cos, sin):
        s = inputs_embeds.shape[1]
        pos = torch.arange(s, device=inputs_embeds.device)
        causal = pos[None, :] <= pos[:, None]  # [S, S]: query row i sees keys 0..i
        allowed = causal[None, None, None] & (attention_mask != 0)[:, None, None, None, :]
        h = inputs_embeds
        kv = []
        for layer in self.stack.layers:
            h, k, v = layer(h, cos, sin, allowed)
            kv.append(torch.stack([k, v]))
        return self.stack.logits(h[:, -1:, :]), torch.stack(kv)


class DecodeGraph(nn.Module):
    """inputs_embeds [1,1,H], attention_mask [1,C] int64 (past slots, then the new token), cos/sin [1,1,1,D],
    past_key_values [L,2,1,kvH,C-1,D] → logits [1,1,V] fp32, present_key_values [L,2,1,kvH,1,D] (new token)."""

    input_names = ("inputs_embeds", "attention_mask", "cos", "sin", "past_key_values")
    output_names = ("logits", "present_key_values")

    def __init__(self, stack: TextStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, inputs_embeds, attention_mask, cos, sin, past_key_values):
        allowed = (attention_mask != 0)[:, None, None, None, :]
        h = inputs_embeds
        kv = []
        for i, layer in enumerate(self.stack.layers):
            h, k, v = layer(h, cos, sin, allowed, past_key_values[i, 0], past_key_values[i, 1])
            kv.append(torch.stack([k, v]))
        return self.stack.logits(h), torch.stack(kv)


def example_inputs(text: TextDims, layout: RankLayout, dtype: torch.dtype, prefill_len: int, max_context: int):
    """Static-shape example inputs for tracing: (prefill args, decode args)."""
    h, d, L = text.hidden, text.head_dim, text.layers
    prefill = (
        torch.zeros(1, prefill_len, h, dtype=dtype),
        torch.ones(1, prefill_len, dtype=torch.int64),
        torch.ones(1, 1, prefill_len, d, dtype=dtype),
        torch.zeros(1, 1, prefill_len, d, dtype=dtype),
    )
    decode = (
        torch.zeros(1, 1, h, dtype=dtype),
        torch.ones(1, max_context, dtype=torch.int64),
        torch.ones(1, 1, 1, d, dtype=dtype),
        torch.zeros(1, 1, 1, d, dtype=dtype),
        torch.zeros(L, 2, 1, layout.kv_heads, max_context - 1, d, dtype=dtype),
    )
    return prefill, decode
