"""Qwen2.5-VL (3B, 7B): the Qwen2 decoder of Qwen2-VL (``models/common/text.py``) with video time positions in
seconds, and a vision tower with RMSNorm, gated SiLU MLPs and window attention (``visual.py``, ``host.py``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qvlc.artifact.signature import GraphSig
from qvlc.artifact.spec import VisualSpec
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family, VisionFeeds

DEFAULT_SECOND_PER_GRID = 1.0  # transformers' get_rope_index without second_per_grid_ts


class Qwen2_5_VL(Family):
    model_type = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    package = "qvlc.models.qwen2_5_vl"
    hf_classes = {
        "config": "transformers.Qwen2_5_VLConfig",
        "model": "transformers.Qwen2_5_VLForConditionalGeneration",
        "vision": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
    }

    def dims(self, config: dict[str, Any], source: str = "config.json") -> ModelDims:
        from qvlc.models.qwen2_5_vl.dims import qwen2_5_vl_vision
        from qvlc.models.qwen2_vl.dims import parse_dims

        return parse_dims(config, source, self.model_type, self.display_name, qwen2_5_vl_vision)

    def visual_graph(self, hf_visual: Any, dims: ModelDims, chunk_width: int, dtype: Any,
                     attention_block: int = 0, islands: Any = None) -> Any:
        from qvlc.models.qwen2_5_vl.visual import VisualGraph

        return VisualGraph(hf_visual, dims.vision, chunk_width, dtype, attention_block, islands)

    def visual_signature(self, spec: VisualSpec) -> GraphSig:
        from qvlc.models.common.vision import visual_signature

        return visual_signature(spec, masks=("attention_mask", "window_attention_mask"))

    def vision_feeds(self, spec: VisualSpec, pixel_values: np.ndarray, grids: np.ndarray) -> VisionFeeds:
        from qvlc.models.qwen2_5_vl.host import window_feeds

        feeds, order = window_feeds(pixel_values, grids, spec.max_patches, spec.patch_dim, spec.head_dim,
                                    spec.merge_size, spec.window, spec.rope_theta, spec.dtype.numpy)
        return VisionFeeds(feeds, len(order), order)

    def video_time_steps(self, videos: int, tokens_per_second: int,
                         second_per_grid_ts: Sequence[float] | None) -> list[float]:
        """transformers 4.57.6 turns second_per_grid_t into an int64 tensor before scaling (0.5 s → 0, 1.5 s → 1),
        then multiplies by tokens_per_second and truncates."""
        secs = list(second_per_grid_ts) if second_per_grid_ts is not None else [DEFAULT_SECOND_PER_GRID] * videos
        return [float(int(s) * tokens_per_second) for s in secs[:videos]]

    def oracle_video_kwargs(self, second_per_grid_ts: Sequence[float] | None) -> dict[str, Any]:
        if second_per_grid_ts is None:
            return {}
        import torch

        return {"second_per_grid_ts": torch.tensor(list(second_per_grid_ts), dtype=torch.float32)}


FAMILY = Qwen2_5_VL()
