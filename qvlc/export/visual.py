"""The visual part's export stage: visual.onnx with one external weights file, and preprocess.json."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qvlc.artifact.layout import PREPROCESS, VISUAL, VISUAL_WEIGHTS
from qvlc.checkpoint.hf_model import LoadedCheckpoint
from qvlc.checkpoint.lazy import lazy_vision_tower
from qvlc.checkpoint.processor import preprocess_config
from qvlc.export.onnx_export import (
    ExportResult,
    export_graph,
    finish_graphs,
    write_shared,
)
from qvlc.export.quantize import quantize_graph
from qvlc.models.common.quantized import quantized_vision, vision_graph_name
from qvlc.models.common.text import example_inputs

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan


def _dequantize_tower(plan: Plan, tower) -> dict:
    """``include: [visual]``: give the loaded tower's Linears their dequantized integers (quantized from the
    checkpoint's own weights, as the oracle reads them); returns the integers by graph initializer name."""
    quant = plan.visual_quant
    if quant is None:
        return {}
    views = quantized_vision(lazy_vision_tower(plan.checkpoint), quant)
    with torch.no_grad():
        for name, view in views.items():
            tower.get_parameter(name).copy_(view.narrow(0, 0, view.shape[0]))
    return {vision_graph_name(name): view.taken for name, view in views.items()}


def export_visual(plan: Plan, ck: LoadedCheckpoint, stage: Path) -> ExportResult:
    """visual.onnx (+ visual_weights.data) and preprocess.json in ``stage``."""
    e = plan.cfg.export
    result = ExportResult(visual=plan.visual_spec)
    pre = preprocess_config(plan.checkpoint, plan.dims.vision, plan.family.video_rules)
    (stage / PREPROCESS).write_text(pre.to_json())
    result.bytes_written += (stage / PREPROCESS).stat().st_size

    dtype = e.dtype.torch
    sig = plan.family.visual_signature(plan.visual_spec)
    weights = _dequantize_tower(plan, ck.visual)
    module = plan.family.visual_graph(ck.visual, plan.dims, e.chunk_width, dtype, e.attention_block, plan.islands)
    graph = export_graph(VISUAL, module, example_inputs(sig), sig, e.opset, e.simplify, stage / "_work")
    if weights:  # the modules computed with the dequantized integers; the graph now carries the integers
        quantize_graph(graph.model, weights, e.weights.dequantize == "explicit")
    del module
    gc.collect()
    stats, result.written[VISUAL_WEIGHTS] = write_shared([graph], stage, VISUAL_WEIGHTS)
    del graph
    gc.collect()
    shutil.rmtree(stage / "_work", ignore_errors=True)  # the onnxsim work files, inside our staging folder
    result.add(stats, finish_graphs(stage, stage, [VISUAL], rank=0))
    return result
