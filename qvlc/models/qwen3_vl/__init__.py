"""Qwen3-VL (2B, 4B, 8B): the shared decoder module with q/k norms, an explicit head_dim, interleaved M-RoPE and
DeepStack rows added after the first decoder layers (``models/common/text.py``); a vision tower with 16-px patches,
a learned position table interpolated on the host and DeepStack mergers (``visual.py``). Each temporal patch of a
video is its own grid in M-RoPE (time is carried by text timestamps)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qvlc.artifact.spec import TokenIds, VisualSpec
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import VisionFeeds
from qvlc.models.qwen2_vl import Qwen2VL


class Qwen3VL(Qwen2VL):
    """Qwen2-VL's visual signature and vision feeds, plus the position table's; the rest its own."""

    model_type = "qwen3_vl"
    display_name = "Qwen3-VL"
    package = "qvlc.models.qwen3_vl"
    hf_classes = {
        "config": "transformers.Qwen3VLConfig",
        "model": "transformers.Qwen3VLForConditionalGeneration",
        "vision": "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel",
    }
    frames_as_grids = True  # a video's temporal patches are separate vision spans (and M-RoPE grids)
    # transformers' init leaves the tiny model's greedy tokens one repeated id; at std 0.2 DeepStack, interleaved
    # M-RoPE and the position table each change them (tests/models/qwen3_vl/test_tiny_is_sharp.py)
    tiny_std = 0.2
    # Qwen3VLVideoProcessor: frames by linspace from the first to the last, the pixel bounds over the whole clip
    video_rules = {"video_sampling": "linspace", "video_budget": "clip"}

    def dims(self, config: dict[str, Any], source: str = "config.json") -> ModelDims:
        from qvlc.models.qwen2_vl.dims import parse_dims
        from qvlc.models.qwen3_vl.dims import qwen3_vl_vision

        return parse_dims(config, source, self.model_type, self.display_name, qwen3_vl_vision)

    def visual_graph(self, hf_visual: Any, dims: ModelDims, chunk_width: int, dtype: Any,
                     attention_block: int = 0, islands: Any = None) -> Any:
        from qvlc.models.qwen3_vl.visual import VisualGraph

        return VisualGraph(hf_visual, dims.vision, chunk_width, dtype, attention_block, islands)

    def vision_feeds(self, spec: VisualSpec, pixel_values: np.ndarray, grids: np.ndarray) -> VisionFeeds:
        """Qwen2-VL's feeds (patches, per-frame mask, 2D rotary), and the position table's rows and weights."""
        from qvlc.host.pos_table import pos_table_feeds

        base = super().vision_feeds(spec, pixel_values, grids)
        idx, wts = pos_table_feeds(grids, spec.pos_table_side, spec.merge_size, spec.max_patches)
        return VisionFeeds({**base.feeds, "pos_idx": idx, "pos_weight": wts.astype(spec.dtype.numpy)}, base.tokens)

    def rope_index(self, input_ids: np.ndarray, tokens: TokenIds, merge_size: int, tokens_per_second: int = 0,
                   image_grid_thw: Any = None, video_grid_thw: Any = None,
                   second_per_grid_ts: Sequence[float] | None = None,
                   attention_mask: Any = None) -> tuple[np.ndarray, int]:
        """transformers 4.57.6 ``Qwen3VLModel.get_rope_index``: every temporal patch of a video is a grid of its
        own (t = 1), so time advances only through the text between them."""
        from qvlc.host.rope import get_rope_index

        videos = None
        if video_grid_thw is not None and len(np.asarray(video_grid_thw)):
            v = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
            videos = np.repeat(v, v[:, 0], axis=0)
            videos[:, 0] = 1
        return get_rope_index(input_ids, tokens, merge_size, image_grid_thw, videos, attention_mask)


FAMILY = Qwen3VL()
