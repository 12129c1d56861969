"""``export.weights.method: gptq``: calibrate the LLM's Linear weights on a text set, one decoder layer in memory
at a time, and write the integers to the artifact's store (``calibration/gptq.safetensors``) before the export.

The calibration runs transformers' own decoder layers (the streamed oracle's classes, fp32), layer-major over
``nsamples`` windows of ``seqlen`` tokens:

1. the windows' embeddings are the first layer's inputs;
2. each layer runs once with its checkpoint weights while hooks accumulate H = 2/N · Σ x xᵀ of every Linear's
   input (q/k/v share one, gate/up share one);
3. each Linear is quantized by GPTQ with its H (``gptq_quantize``), written to the store, and the layer takes
   the dequantized weights;
4. the layer runs again, quantized: its outputs are the next layer's inputs (the reference algorithm: each layer
   is calibrated on what the quantized layers before it compute).

lm_head (``include: [lm_head]``) is calibrated last, on the final norm's outputs. For every Linear the output
error on the calibration tokens, ‖(W − Ŵ) X‖ / ‖W X‖, is measured for GPTQ and for round to nearest with the same
scales' rules; ``calibration/calibration.json`` records both, and the parity report summarises them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qvlc.checkpoint.hf_model import Shell, causal
from qvlc.checkpoint.lazy import lazy_text_model, materialize, read_float
from qvlc.models.common.quantized import LINEARS, linear_at
from qvlc.weights.gptq import STORE, GptqStore, StoreLayout, gptq_quantize
from qvlc.weights.quant import quantize_rtn

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan

RECORD = "calibration/calibration.json"
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}  # Linears that read the same tensor share its H
TOKENS_PER_BATCH = 2048  # calibration windows run together (attention memory: batch × heads × seqlen²)


class _Hessians:
    """Forward pre-hooks on a layer's Linears that accumulate Σ x xᵀ of their inputs (one per distinct input)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.h: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = self.h.get(name)
            self.h[name] = x.T @ x if h is None else h.addmm_(x.T, x)
        return hook

    def done(self, tokens: int) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return {k: v * (2.0 / tokens) for k, v in self.h.items()}


def _errors(w: np.ndarray, h: torch.Tensor, *quantized) -> list[float]:
    """‖(W − Ŵ) X‖ / ‖W X‖ on the calibration tokens, from H alone: tr(Δ H Δᵀ) / tr(W H Wᵀ)."""
    W = torch.from_numpy(w)
    base = float(torch.sum((W @ h) * W))
    out = []
    for q in quantized:
        d = W - torch.from_numpy(q)
        out.append(float(np.sqrt(max(float(torch.sum((d @ h) * d)), 0.0) / max(base, 1e-30))))
    return out


def calibrate(plan: Plan, stage: Path) -> Path:
    """Calibrate every included Linear on ``plan.calibration``'s windows and write the store and its record under
    ``stage``; returns the store's path."""
    cfg = plan.cfg
    windows, source, set_tokens = plan.calibration.windows, plan.calibration.source, plan.calibration.set_tokens
    w = cfg.export.weights
    bits, group = w.format.bits, (None if w.format == "int8" else w.group_size)
    dtype = cfg.export.dtype.numpy
    shell = Shell(plan.family, plan.checkpoint)
    text, head = lazy_text_model(plan.checkpoint)
    shapes: dict[str, tuple[int, int]] = {}
    if "llm" in w.include:
        for layer in text.layers:
            for path in LINEARS:
                t = linear_at(layer, path).weight
                shapes[t.name] = tuple(t.shape)
    if "lm_head" in w.include:
        shapes[head.weight.name] = tuple(head.weight.shape)
    layout = StoreLayout(bits, group or 0, w.symmetric)
    store = GptqStore(stage / STORE, layout, shapes, {"source": source})
    records: list[dict] = []

    def quantize(name: str, weight: np.ndarray, h: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        qw = gptq_quantize(weight, h, bits, group, w.symmetric, dtype)
        rtn = quantize_rtn(weight, bits, group, w.symmetric, dtype)
        deq = qw.dequantize(dtype).astype(np.float32)
        g_err, r_err = _errors(weight, h, deq, rtn.dequantize(dtype).astype(np.float32))
        store.put(name, qw)
        records.append({"weight": name, "gptq_error": g_err, "rtn_error": r_err,
                        "seconds": round(time.perf_counter() - t0, 3)})
        return deq

    try:
        _run_layers(plan, shell, text, head, windows, quantize)
    finally:
        store.close()
    ratio = [r["gptq_error"] / r["rtn_error"] for r in records if r["rtn_error"] > 0]
    n, seqlen = windows.shape
    (stage / RECORD).write_text(json.dumps({
        "method": "gptq", "format": str(w.format), "group_size": group, "symmetric": w.symmetric,
        "source": source, "set_tokens": set_tokens, "nsamples": n, "seqlen": seqlen,
        "gptq_over_rtn": {"median": float(np.median(ratio)), "worst": float(np.max(ratio))} if ratio else None,
        "weights": records}, indent=1) + "\n")
    return stage / STORE


@torch.no_grad()
def _run_layers(plan: Plan, shell: Shell, text, head, windows: np.ndarray, quantize) -> None:
    """Steps 1-4 of the module docstring over every layer, then lm_head; ``quantize(name, weight, H)`` quantizes
    one Linear, stores it and returns its dequantized weight."""
    dims, include = plan.dims, plan.cfg.export.weights.include
    n, seqlen = windows.shape
    batch = max(1, TOKENS_PER_BATCH // seqlen)
    table = read_float(text, "embed_tokens.weight")
    hidden = table[torch.from_numpy(windows)]
    del table
    pos = torch.arange(seqlen).view(1, 1, -1).expand(3, batch, -1)
    mask = causal(seqlen)

    def run(layer: torch.nn.Module, out: torch.Tensor | None) -> None:
        for a in range(0, n, batch):
            h = hidden[a:a + batch]
            p = pos[:, :len(h)]
            y = layer(h, attention_mask=mask, position_ids=p, past_key_values=None, use_cache=False,
                      cache_position=torch.arange(seqlen), position_embeddings=shell.rotary(h, p))
            if out is not None:
                out[a:a + batch] = y[0] if isinstance(y, tuple) else y

    if "llm" in include:
        for i in range(dims.text.layers):
            layer = materialize(shell.layer_cls, shell.text_config, i, tree=text.layers[i])
            hooks = _Hessians({p: linear_at(layer, p) for p in LINEARS if p not in SHARED_INPUT})
            run(layer, None)
            hs = hooks.done(n * seqlen)
            for path in LINEARS:
                linear = linear_at(layer, path)
                deq = quantize(linear_at(text.layers[i], path).weight.name, linear.weight.numpy(),
                               hs[SHARED_INPUT.get(path, path)])
                linear.weight.copy_(torch.from_numpy(deq))
            del hs
            out = torch.empty_like(hidden)
            run(layer, out)
            hidden = out
            del layer
    if "lm_head" in include:
        norm = materialize(shell.norm_cls, dims.text.hidden, dims.text.rms_eps, tree=text.norm)
        x = norm(hidden).reshape(-1, dims.text.hidden)
        quantize(head.weight.name, read_float(head, "weight").numpy(), x.T @ x * (2.0 / len(x)))
