"""Qwen2-VL (2B, 7B): the first family. Its LLM is the shared Qwen2 decoder (``models/common/text.py``); its
vision tower (LayerNorm blocks, fc1/fc2 MLP, every block attending per frame) is ``visual.py``."""

from __future__ import annotations

from typing import Any

import numpy as np

from qvlc.artifact.signature import GraphSig
from qvlc.artifact.spec import VisualSpec
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family, VisionFeeds


class Qwen2VL(Family):
    model_type = "qwen2_vl"
    display_name = "Qwen2-VL"
    package = "qvlc.models.qwen2_vl"
    hf_classes = {
        "config": "transformers.Qwen2VLConfig",
        "model": "transformers.Qwen2VLForConditionalGeneration",
        "vision": "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",
    }

    def dims(self, config: dict[str, Any], source: str = "config.json") -> ModelDims:
        from qvlc.models.qwen2_vl.dims import parse_dims, qwen2_vl_vision

        return parse_dims(config, source, self.model_type, self.display_name, qwen2_vl_vision)

    def visual_graph(self, hf_visual: Any, dims: ModelDims, chunk_width: int, dtype: Any,
                     attention_block: int = 0, islands: Any = None) -> Any:
        from qvlc.models.qwen2_vl.visual import VisualGraph

        return VisualGraph(hf_visual, dims.vision, chunk_width, dtype, attention_block, islands)

    def visual_signature(self, spec: VisualSpec) -> GraphSig:
        from qvlc.models.common.vision import visual_signature

        return visual_signature(spec)

    def vision_feeds(self, spec: VisualSpec, pixel_values: np.ndarray, grids: np.ndarray) -> VisionFeeds:
        from qvlc.host.vision import (
            padded_patches,
            vision_attention_mask,
            vision_cos_sin,
        )

        dt = spec.dtype.numpy
        cos, sin = vision_cos_sin(grids, spec.head_dim, spec.merge_size, spec.max_patches, spec.rope_theta, dt)
        feeds = {"pixel_values": padded_patches(pixel_values, grids, spec.max_patches, spec.patch_dim, dt),
                 "attention_mask": vision_attention_mask(grids, spec.max_patches), "cos": cos, "sin": sin}
        return VisionFeeds(feeds, int(np.asarray(grids).prod(axis=1).sum()) // spec.merge_unit)


FAMILY = Qwen2VL()
