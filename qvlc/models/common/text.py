"""Deployment modules for the Qwen2 decoder the Qwen-VL families share: the prefill, decode and chunk graphs.

Our own small modules holding the Hugging Face parameters (views, or this rank's slice of them; converted only
when the export dtype differs). They compute what transformers' eager text model computes, with the choices a
static accelerator graph needs: rotary cos/sin arrive as inputs, the KV cache is one packed tensor, masks are
built from an int64 ``attention_mask`` in the graph, and every tensor-parallel reduction is an explicit
``AllReduce`` placed where ``QWEN2_TP_PLAN`` says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvlc.artifact.layout import CHUNK, DECODE, PREFILL
from qvlc.artifact.signature import GraphSig, TensorSig
from qvlc.artifact.spec import LlmSpec
from qvlc.models.common.dims import TextDims
from qvlc.models.common.islands import TEXT_LAYERS, Islands
from qvlc.models.common.kvquant import KvStore
from qvlc.models.common.layers import Linear, RMSNorm, rotate_half, take
from qvlc.models.common.tp import Axis, RankLayout, Shard, TpPlan, shard_linear
from qvlc.parallel.allreduce import all_reduce
from qvlc.precision import KvCache

# The Megatron split of a Qwen2 decoder layer: column-parallel q/k/v and gate/up, row-parallel o_proj and
# down_proj each followed by a sum over ranks, the output projection split by vocabulary; norms replicated.
QWEN2_TP_PLAN = TpPlan(
    layer=(
        Shard("self_attn.q_proj", "output", Axis.HEADS, bias=True),
        Shard("self_attn.k_proj", "output", Axis.KV_HEADS, bias=True),
        Shard("self_attn.v_proj", "output", Axis.KV_HEADS, bias=True),
        Shard("self_attn.o_proj", "input", Axis.HEADS, reduce_after=True),
        Shard("mlp.gate_proj", "output", Axis.FEATURES),
        Shard("mlp.up_proj", "output", Axis.FEATURES),
        Shard("mlp.down_proj", "input", Axis.FEATURES, reduce_after=True),
    ),
    head=Shard("lm_head", "vocab", Axis.VOCAB),
)


class _Sharded(nn.Module):
    """A module whose Linears are this rank's slices, as the plan declares under ``prefix``."""

    def _linear(self, hf: nn.Module, name: str, prefix: str, layout: RankLayout, unit: int,
                dtype: torch.dtype) -> Linear:
        shard = QWEN2_TP_PLAN.shard(f"{prefix}.{name}")
        return shard_linear(getattr(hf, name), shard, layout, unit if shard.axis in (Axis.HEADS, Axis.KV_HEADS)
                            else 1, dtype)

    def _reduce(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return all_reduce(x) if self.tp > 1 and QWEN2_TP_PLAN.shard(name).reduce_after else x


class Attention(_Sharded):
    def __init__(self, hf: nn.Module, text: TextDims, layout: RankLayout, dtype: torch.dtype,
                 store: KvStore | None = None) -> None:
        super().__init__()
        d = text.head_dim
        self.store = store or KvStore(KvCache.FP, dtype)
        self.heads, self.kv_heads, self.head_dim = layout.heads, layout.kv_heads, d
        self.tp = layout.tp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, self._linear(hf, name, "self_attn", layout, d, dtype))
        # Qwen3: RMSNorm over each head of q and k before rotary (replicated: it acts within a head)
        self.q_norm, self.k_norm = (RMSNorm(norm.weight, text.rms_eps, dtype) if norm is not None else None
                                    for norm in (getattr(hf, "q_norm", None), getattr(hf, "k_norm", None)))

    def forward(self, x, cos, sin, allowed, past_k=None, past_v=None):
        b, t, _ = x.shape
        d, nh, kvh = self.head_dim, self.heads, self.kv_heads
        q = self.q_proj(x).view(b, t, nh, d)
        k = self.k_proj(x).view(b, t, kvh, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, kvh, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        (k_parts, k), (v_parts, v) = self.store.pack(k), self.store.pack(v)  # int8: attention reads q * scale
        keys = k if past_k is None else torch.cat([past_k.to(k.dtype), k], dim=2)
        values = v if past_v is None else torch.cat([past_v.to(v.dtype), v], dim=2)
        n = keys.shape[2]
        g = nh // kvh
        # Grouped-query attention without repeating K/V: the g query heads of one kv head become g*t rows.
        scores = torch.matmul(q.reshape(b, kvh, g * t, d), keys.transpose(2, 3)) * (d**-0.5)
        scores = scores.view(b, kvh, g, t, n).float()
        # where() rather than adding a bias: a fully masked (left-pad) row stays finite in fp16 too.
        scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(x.dtype).view(b, kvh, g * t, n)
        out = torch.matmul(probs, values).view(b, nh, t, d).transpose(1, 2).reshape(b, t, nh * d)
        return self._reduce(self.o_proj(out), "self_attn.o_proj"), k_parts, v_parts


class MLP(_Sharded):
    def __init__(self, hf: nn.Module, layout: RankLayout, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = layout.tp
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, self._linear(hf, name, "mlp", layout, 1, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), "mlp.down_proj")


class DecoderLayer(nn.Module):
    """One decoder layer; with fp32 islands (``Islands``) its attention and/or MLP compute in fp32 and its residual
    stream may be carried in fp32. The KV it returns is the cache's parts (``KvStore``): the graph dtype, or int8 and
    fp32 scales, either way."""

    def __init__(self, hf: nn.Module, text: TextDims, layout: RankLayout, dtype: torch.dtype, index: int = 0,
                 islands: Islands = Islands(), kv_cache: KvCache = KvCache.FP) -> None:
        super().__init__()
        name = f"{TEXT_LAYERS}.{index}"
        self.dtype = dtype
        self.attn_dtype = torch.float32 if islands.fp32(f"{name}.self_attn") else dtype
        self.mlp_dtype = torch.float32 if islands.fp32(f"{name}.mlp") else dtype
        self.residual_dtype = torch.float32 if islands.residual_fp32(index) else dtype
        self.input_layernorm = RMSNorm(hf.input_layernorm.weight, text.rms_eps, dtype)
        self.self_attn = Attention(hf.self_attn, text, layout, self.attn_dtype, KvStore(kv_cache, dtype))
        self.post_attention_layernorm = RMSNorm(hf.post_attention_layernorm.weight, text.rms_eps, dtype)
        self.mlp = MLP(hf.mlp, layout, self.mlp_dtype)

    def forward(self, h, cos, sin, allowed, past_k=None, past_v=None):
        h = h.to(self.residual_dtype)  # a no-op without islands
        a, k, v = self.self_attn(self.input_layernorm(h).to(self.attn_dtype), cos, sin, allowed, past_k, past_v)
        h = h + a.to(h.dtype)
        h = h + self.mlp(self.post_attention_layernorm(h).to(self.mlp_dtype)).to(h.dtype)
        return h, k, v


class TextStack(nn.Module):
    """The decoder layers, final norm and (this rank's slice of) lm_head, shared by prefill and decode."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, text: TextDims, layout: RankLayout,
                 dtype: torch.dtype, islands: Islands = Islands(), kv_cache: KvCache = KvCache.FP) -> None:
        super().__init__()
        self.kv = KvStore(kv_cache, dtype)
        self.layers = nn.ModuleList(DecoderLayer(layer, text, layout, dtype, i, islands, kv_cache)
                                    for i, layer in enumerate(text_model.layers))
        self.norm = RMSNorm(text_model.norm.weight, text.rms_eps, dtype)
        start, length = layout.range(QWEN2_TP_PLAN.head.axis)
        self.head_dtype = torch.float32 if islands.fp32("lm_head") else dtype
        self.lm_head = Linear(take(lm_head.weight, 0, start, length, self.head_dtype))

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_last).to(self.head_dtype)).float()


def _deepstack(h: torch.Tensor, deepstack_embeds: torch.Tensor | None, i: int) -> torch.Tensor:
    """DeepStack (Qwen3-VL): the vision rows' k-th embedding added to the hidden states after layer k < K."""
    if deepstack_embeds is not None and i < deepstack_embeds.shape[0]:
        return h + deepstack_embeds[i].to(h.dtype)
    return h


class PrefillGraph(nn.Module):
    """inputs_embeds [1,S,H], attention_mask [1,S] int64 (0 = left pad), cos/sin [1,1,S,D]
    (, deepstack_embeds [k,1,S,H]: added to the hidden states after layers 0..k-1 — DeepStack; zeros outside the
    vision rows) → logits [1,1,V] (last position, fp32), present_key_values [L,2,1,kvH,S,D] (int8 cache: int8, and
    present_kv_scales [L,2,1,kvH,S] fp32)."""

    def __init__(self, stack: TextStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, inputs_embeds, attention_mask, cos, sin, deepstack_embeds=None):
        s = inputs_embeds.shape[1]
        pos = torch.arange(s, device=inputs_embeds.device)
        causal = pos[None, :] <= pos[:, None]  # [S, S]: query row i sees keys 0..i
        allowed = causal[None, None, None] & (attention_mask != 0)[:, None, None, None, :]
        h = inputs_embeds
        kv = []
        for i, layer in enumerate(self.stack.layers):
            h, k, v = layer(h, cos, sin, allowed)
            h = _deepstack(h, deepstack_embeds, i)
            kv.append((k, v))
        return self.stack.logits(h[:, -1:, :]), *self.stack.kv.present(kv)


class PastGraph(nn.Module):
    """T new tokens against the packed past cache: the decode graph (T = 1) and the chunk graph (T > 1).

    inputs_embeds [1,T,H], attention_mask [1,C-1+T] int64 (the C-1 past slots, then the T new tokens; 0 = empty
    slot or left pad), cos/sin [1,1,T,D], past_key_values [L,2,1,kvH,C-1,D] (int8 cache: int8, then
    past_kv_scales [L,2,1,kvH,C-1] fp32) (, deepstack_embeds [k,1,T,H], chunk only) → logits [1,1,V] fp32 of the
    last new token, present_key_values [L,2,1,kvH,T,D] (the new tokens' K/V; int8 cache: and present_kv_scales).
    A new token sees every allowed past slot and the new tokens up to itself."""

    def __init__(self, stack: TextStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, inputs_embeds, attention_mask, cos, sin, past_key_values, *rest):
        store = self.stack.kv
        cache = (past_key_values, rest[0]) if store.int8 else (past_key_values,)
        deepstack_embeds = rest[len(cache) - 1] if len(rest) > len(cache) - 1 else None
        t, past = inputs_embeds.shape[1], past_key_values.shape[4]
        valid = (attention_mask != 0)[:, None, None, None, :]  # [1,1,1,1,C-1+T]
        if t == 1:
            allowed = valid
        else:
            pos = torch.arange(t, device=inputs_embeds.device)
            causal = pos[None, :] <= pos[:, None]  # [T, T]
            allowed = torch.cat([valid[..., :past].expand(-1, -1, -1, t, -1),
                                 valid[..., past:] & causal[None, None, None]], dim=-1)
        h = inputs_embeds
        kv = []
        for i, layer in enumerate(self.stack.layers):
            h, k, v = layer(h, cos, sin, allowed, *store.past(cache, i))
            h = _deepstack(h, deepstack_embeds, i)
            kv.append((k, v))
        return self.stack.logits(h[:, -1:, :]), *store.present(kv)


GRAPH_MODULES = {PREFILL: PrefillGraph, DECODE: PastGraph, CHUNK: PastGraph}


def llm_signatures(spec: LlmSpec) -> dict[str, GraphSig]:
    """The prefill and decode interfaces of DESIGN.md section 3 for one rank (V: the rank's vocab slice), and the
    chunk graph's when the spec has one (``export.prefill_chunk``)."""
    s, dt = spec, spec.dtype.onnx_name
    S, C, H, D, L, kvh = s.prefill_len, s.max_context, s.hidden, s.head_dim, s.layers, s.kv_heads_per_rank
    V = s.vocab // s.tp
    int8 = KvCache(s.kv_cache) is KvCache.INT8
    logits = TensorSig("logits", (1, 1, V), "float32")

    def cache(kind: str, rows: int) -> tuple[TensorSig, ...]:
        """``kind``_key_values (and its scales, int8) for ``rows`` positions."""
        kv = TensorSig(f"{kind}_key_values", (L, 2, 1, kvh, rows, D), "int8" if int8 else dt)
        return (kv, TensorSig(f"{kind}_kv_scales", (L, 2, 1, kvh, rows), "float32")) if int8 else (kv,)

    def deepstack(rows: int) -> tuple[TensorSig, ...]:
        return (TensorSig("deepstack_embeds", (s.deepstack_layers, 1, rows, H), dt),) if s.deepstack_layers else ()

    def past_graph(t: int, vision: bool) -> GraphSig:
        return GraphSig(
            inputs=(TensorSig("inputs_embeds", (1, t, H), dt), TensorSig("attention_mask", (1, C - 1 + t), "int64"),
                    TensorSig("cos", (1, 1, t, D), dt), TensorSig("sin", (1, 1, t, D), dt),
                    *cache("past", C - 1), *(deepstack(t) if vision else ())),
            outputs=(logits, *cache("present", t)))

    prefill = GraphSig(
        inputs=(TensorSig("inputs_embeds", (1, S, H), dt), TensorSig("attention_mask", (1, S), "int64"),
                TensorSig("cos", (1, 1, S, D), dt), TensorSig("sin", (1, 1, S, D), dt), *deepstack(S)),
        outputs=(logits, *cache("present", S)))
    sigs = {PREFILL: prefill, DECODE: past_graph(1, vision=False)}
    if s.prefill_chunk:
        sigs[CHUNK] = past_graph(s.prefill_chunk, vision=True)
    return sigs


def example_inputs(sig: GraphSig) -> tuple[torch.Tensor, ...]:
    """Static-shape example inputs for tracing a graph with this signature (values do not matter), each in the
    dtype the signature names (the graph dtype, int64 masks, an int8 cache and its fp32 scales)."""
    return tuple(torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) if t.dtype.startswith("float")
                 else torch.ones(t.shape, dtype=getattr(torch, t.dtype)) for t in sig.inputs)
