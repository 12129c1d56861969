"""A config that passed every check that needs no weights, with its checkpoint, family and dims resolved: what
every compile stage takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qvlc.config import Config
from qvlc.config_checks import check_against_model
from qvlc.contract import LlmSpec, VisualSpec
from qvlc.models import inspect_checkpoint, tiny_family
from qvlc.models.common.checkpoint import check_weight_shapes, read_config_json
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family


@dataclass(frozen=True)
class Plan:
    cfg: Config
    checkpoint: Path
    family: Family
    dims: ModelDims

    @property
    def llm_spec(self) -> LlmSpec:
        e = self.cfg.export
        return self.family.llm_spec(self.dims, e.prefill_len, e.max_context, e.tp, e.dtype)

    @property
    def visual_spec(self) -> VisualSpec:
        e = self.cfg.export
        return self.family.visual_spec(self.dims, e.max_patches, e.chunk_width, e.dtype)


def check(cfg: Config) -> Plan:
    """Every check that needs no weight: the config, then the checkpoint folder, its family and config.json."""
    tiny = tiny_family(cfg.model.checkpoint)
    if tiny is not None:
        from qvlc.models.common.tiny import tiny_checkpoint

        folder = tiny_checkpoint(family=tiny)
    else:
        folder = Path(cfg.model.checkpoint).expanduser()
    family, dims = inspect_checkpoint(folder)
    check_against_model(cfg, dims, family)
    check_weight_shapes(folder, family, read_config_json(folder))
    return Plan(cfg, folder, family, dims)
