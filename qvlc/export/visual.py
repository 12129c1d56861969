"""The visual part's export stage: visual.onnx with one external weights file, and preprocess.json."""

from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path

import torch

from qvlc.checkpoint.lazy import lazy_vision_tower
from qvlc.checkpoint.load import LoadedCheckpoint
from qvlc.contract import PREPROCESS, VISUAL, VISUAL_WEIGHTS
from qvlc.errors import CheckpointError
from qvlc.export.onnx_export import (
    ExportResult,
    export_graph,
    finish_graphs,
    write_shared,
)
from qvlc.export.quantize import quantize_graph
from qvlc.host.preprocess import PREPROCESSOR_CONFIG_NAME, PreprocessConfig
from qvlc.models.common.dims import VisionDims
from qvlc.models.common.quantized import quantized_vision, vision_graph_name
from qvlc.models.common.text import example_inputs
from qvlc.plan import Plan


def preprocess_config(checkpoint: Path, vision: VisionDims,
                      video_rules: dict[str, str] | None = None) -> PreprocessConfig:
    """The checkpoint's preprocessing, with patch/temporal/merge sizes that must agree with its vision config and
    the family's video rules (``Family.video_rules``).

    Without a preprocessor_config.json, the sizes come from the vision config (the other values keep Qwen2-VL's
    defaults); a file that disagrees with the vision config is an error.
    """
    pre = dataclasses.replace(PreprocessConfig.from_checkpoint(checkpoint), **(video_rules or {}))
    sizes = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
             "merge_size": vision.merge_size}
    if not (Path(checkpoint) / PREPROCESSOR_CONFIG_NAME).is_file():
        pre = dataclasses.replace(pre, **sizes)
    wrong = [f"{k} {getattr(pre, k)} (vision_config: {want})" for k, want in sizes.items() if getattr(pre, k) != want]
    if pre.in_chans != vision.in_chans:
        wrong.append(f"{pre.in_chans} channels of image_mean/image_std (vision_config: {vision.in_chans})")
    if wrong:
        raise CheckpointError(
            f"{PREPROCESSOR_CONFIG_NAME} disagrees with config.json: {'; '.join(wrong)}",
            fix=f"restore the {PREPROCESSOR_CONFIG_NAME} that ships with the checkpoint", key="model.checkpoint")
    return pre


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
    graph = export_graph(VISUAL, module, example_inputs(sig, dtype), sig, e.opset, e.simplify, stage / "_work")
    if weights:  # the modules computed with the dequantized integers; the graph now carries the integers
        quantize_graph(graph.model, weights, e.weights.dequantize == "explicit")
    del module
    gc.collect()
    stats = write_shared([graph], stage, VISUAL_WEIGHTS)
    del graph
    gc.collect()
    shutil.rmtree(stage / "_work", ignore_errors=True)  # the onnxsim work files, inside our staging folder
    result.add(stats, finish_graphs(stage, stage, [VISUAL], rank=0))
    return result
