"""Qwen2.5-VL's vision_config → ``VisionDims`` (the text and token fields are read as for Qwen2-VL)."""

from __future__ import annotations

from typing import Any

from qvlc.errors import CheckpointError
from qvlc.models.common.dims import VisionDims


def qwen2_5_vl_vision(vis: dict[str, Any], text_hidden: int) -> VisionDims:
    """hidden_size is the tower's width, intermediate_size its gated MLP, out_hidden_size the merger's output;
    window_size is in pixels: window = window_size // merge // patch merged tokens per side."""
    heads, embed = int(vis["num_heads"]), int(vis["hidden_size"])
    depth, patch, merge = int(vis["depth"]), int(vis.get("patch_size", 14)), int(vis.get("spatial_merge_size", 2))
    window = int(vis.get("window_size", 112)) // merge // patch
    full = tuple(int(i) for i in vis.get("fullatt_block_indexes", ()))
    if window < 1:
        raise CheckpointError(f"vision_config.window_size {vis.get('window_size')} is smaller than one merged "
                              f"patch ({merge * patch} pixels)", fix="use the config.json that ships with the "
                              "checkpoint", key="model.checkpoint")
    if any(not 0 <= i < depth for i in full):
        raise CheckpointError(f"vision_config.fullatt_block_indexes {list(full)} names blocks outside 0..{depth - 1}",
                              fix="use the config.json that ships with the checkpoint", key="model.checkpoint")
    return VisionDims(
        depth=depth, embed_dim=embed, heads=heads, head_dim=embed // heads, mlp_hidden=int(vis["intermediate_size"]),
        out_hidden=int(vis.get("out_hidden_size", text_hidden)), patch_size=patch,
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)), merge_size=merge,
        in_chans=int(vis.get("in_chans", vis.get("in_channels", 3))), hidden_act=str(vis.get("hidden_act", "silu")),
        window=window, fullatt_blocks=full, tokens_per_second=int(vis.get("tokens_per_second", 2)))
