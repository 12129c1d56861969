"""The visual part's export stage: visual.onnx with one external weights file, and preprocess.json."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.artifacts import discard
from qvlc.errors import CheckpointError
from qvlc.export.onnx_export import ExportedGraph, ExportResult, check_graph, export_module, graph_io, simplify, \
    write_shared
from qvlc.host.preprocess import PREPROCESSOR_CONFIG_NAME, PreprocessConfig
from qvlc.models.qwen2_vl import visual as visual_mod
from qvlc.models.qwen2_vl.checkpoint import LoadedCheckpoint
from qvlc.models.qwen2_vl.dims import VisionDims
from qvlc.models.qwen2_vl.llm import DTYPES
from qvlc.runtime_visual import PREPROCESS, VISUAL, VISUAL_WEIGHTS, VisualSpec

if TYPE_CHECKING:
    from qvlc.pipeline import Plan


def visual_spec(plan: "Plan") -> VisualSpec:
    cfg, v = plan.cfg, plan.dims.vision
    return VisualSpec(cfg.export.max_patches, v.patch_dim, v.head_dim, v.merge_size, v.out_hidden,
                      tuple(visual_mod.chunk_widths(v.out_hidden, cfg.export.chunk_width)), cfg.export.dtype)


def preprocess_config(checkpoint: Path, vision: VisionDims) -> PreprocessConfig:
    """The checkpoint's preprocessing, with patch/temporal/merge sizes that must agree with its vision config.

    Without a preprocessor_config.json, the sizes come from the vision config (the other values keep Qwen2-VL's
    defaults); a file that disagrees with the vision config is an error.
    """
    pre = PreprocessConfig.from_checkpoint(checkpoint)
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


def export_visual(plan: "Plan", ck: LoadedCheckpoint, stage: Path, simplify_graphs: bool) -> ExportResult:
    """visual.onnx (+ visual_weights.data) and preprocess.json in ``stage``."""
    e, vision = plan.cfg.export, plan.dims.vision
    result = ExportResult()
    pre = preprocess_config(plan.checkpoint, vision)
    (stage / PREPROCESS).write_text(pre.to_json())
    result.bytes_written += (stage / PREPROCESS).stat().st_size

    dtype = DTYPES[e.dtype]
    module = visual_mod.VisualGraph(ck.visual, vision, e.chunk_width, dtype)
    args = visual_mod.example_inputs(vision, e.max_patches, dtype)
    graph = ExportedGraph(VISUAL, export_module(module, args, module.input_names, module.output_names, e.opset))
    del module, args
    gc.collect()
    if simplify_graphs:
        graph = simplify(graph, stage / "_work")
    stats = write_shared([graph], stage, VISUAL_WEIGHTS)
    del graph
    gc.collect()
    discard(stage / "_work")
    check_graph(stage / VISUAL)
    result.bytes_written += int(stats["weights_bytes"]) + (stage / VISUAL).stat().st_size
    result.weights_unshared_bytes += int(stats["unshared_bytes"])
    result.write_seconds += stats["write_seconds"]
    result.graphs.append({"file": VISUAL, "rank": 0, **graph_io(stage / VISUAL)})
    result.manifest = {"visual": visual_spec(plan).to_dict()}
    return result
