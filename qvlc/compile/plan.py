"""A config that passed every check that needs no weights, with its checkpoint, family and dims resolved: what
every compile stage takes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.artifact.layout import Part
from qvlc.artifact.spec import LlmSpec, VisualSpec
from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.load import check_weight_shapes, read_config_json
from qvlc.checkpoint.resolve import checkpoint_folder
from qvlc.compile.memory_estimate import check_memory
from qvlc.config.model_checks import (
    check_against_model,
    check_imported,
    imported_opset,
)
from qvlc.config.schema import MIN_OPSET, Config
from qvlc.config.weights import QuantMethod, weights_opset
from qvlc.config.yaml_to_dataclass import AUTO
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family
from qvlc.models.common.islands import Islands, islands, part_units
from qvlc.weights.gptq import CalibratedQuant
from qvlc.weights.imported import ImportedQuant, imported_quant
from qvlc.weights.quant import WeightQuant

if TYPE_CHECKING:
    from qvlc.export.calibration_data import CalibrationSet


@dataclass(frozen=True)
class Plan:
    cfg: Config
    checkpoint: Path
    family: Family
    dims: ModelDims
    auto_islands: Islands | None = None  # export.fp32_layers: auto, once the range probe (or a manifest) resolved it
    imported: ImportedQuant | None = None  # the checkpoint's own quantization (GPTQ/AWQ), with the export dtype
    calibration: "CalibrationSet | None" = None  # method gptq, compiling: the windows, read in the check stage
    calibrated: Path | None = None  # method gptq: the store of the calibrated integers, once written

    @property
    def islands(self) -> Islands:
        """The modules the fp16 graphs compute in fp32 (export.fp32_layers, resolved against this part's modules)."""
        patterns = self.cfg.export.fp32_layers
        if patterns == (AUTO,):
            return self.auto_islands or Islands()
        return islands(patterns, part_units(self.cfg.part, self.dims))

    @property
    def quant(self) -> WeightQuant | ImportedQuant | None:
        """How the LLM's Linear weights are read: the checkpoint's own integers (an imported GPTQ/AWQ checkpoint),
        export.weights (round to nearest), or None (floats in the export dtype)."""
        if self.cfg.part != Part.LLM:
            return None
        w = self.cfg.export.weights
        if w.enabled and w.method == QuantMethod.GPTQ:
            if self.calibrated is None:
                raise RuntimeError("method gptq: the weights are read from the calibration store, not written yet")
            return CalibratedQuant(self.calibrated, w.format, tuple(w.include), self.cfg.export.dtype)
        return self.imported or WeightQuant.of(w, self.cfg.export.dtype)

    @property
    def visual_quant(self) -> WeightQuant | None:
        """How the vision tower's Linear weights are read (``include: [visual]``, round to nearest), or None."""
        w = self.cfg.export.weights
        if self.cfg.part != Part.VISUAL or not w.enabled or "visual" not in w.include:
            return None
        return WeightQuant.of(w, self.cfg.export.dtype)

    @property
    def calibrating(self) -> bool:
        w = self.cfg.export.weights
        return self.cfg.part == Part.LLM and w.enabled and w.method == QuantMethod.GPTQ

    @property
    def auto(self) -> bool:
        return self.cfg.export.fp32_layers == (AUTO,)

    @property
    def llm_spec(self) -> LlmSpec:
        e = self.cfg.export
        return self.family.llm_spec(self.dims, e.prefill_len, e.max_context, e.tp, e.dtype, e.prefill_chunk,
                                    e.kv_cache)

    @property
    def visual_spec(self) -> VisualSpec:
        e = self.cfg.export
        return self.family.visual_spec(self.dims, e.max_patches, e.chunk_width, e.dtype)


def checked_plan(cfg: Config) -> Plan:
    """Every check that needs no weight: the config, then the checkpoint folder, its family and config.json."""
    folder = checkpoint_folder(cfg.model.checkpoint)
    family, dims = inspect_checkpoint(folder)
    config = read_config_json(folder)
    imported = imported_quant(config, str(folder / "config.json"))
    if imported is not None:
        imported = replace(imported, dtype=cfg.export.dtype)
        check_imported(cfg, dims, imported)
    if cfg.export.opset == 0:  # not set: the lowest opset that expresses the graphs
        needed = max(MIN_OPSET, weights_opset(cfg.export.weights),
                     imported_opset(imported, cfg) if imported is not None and cfg.part == Part.LLM else MIN_OPSET)
        cfg = replace(cfg, export=replace(cfg.export, opset=needed))
    check_against_model(cfg, dims, family)
    check_memory(cfg, dims)
    check_weight_shapes(folder, family, config, vision_only=cfg.part == Part.VISUAL, imported=imported)
    return Plan(cfg, folder, family, dims, imported=imported)
