"""Qwen3-VL's vision_config → ``VisionDims`` (the text and token fields are read as for Qwen2-VL, with the explicit
``head_dim`` and interleaved M-RoPE its text_config carries)."""

from __future__ import annotations

import math
from typing import Any

from qvlc.errors import CheckpointError
from qvlc.models.common.dims import VisionDims


def qwen3_vl_vision(vis: dict[str, Any], text_hidden: int) -> VisionDims:
    """hidden_size is the tower's width, intermediate_size its MLP, out_hidden_size the mergers' output; a learned
    position table of num_position_embeddings rows (a square); DeepStack mergers after deepstack_visual_indexes."""
    heads, embed, depth = int(vis["num_heads"]), int(vis["hidden_size"]), int(vis["depth"])
    table = int(vis.get("num_position_embeddings", 2304))
    side = math.isqrt(table)
    deepstack = tuple(int(i) for i in vis.get("deepstack_visual_indexes", ()))
    if side * side != table:
        raise CheckpointError(f"vision_config.num_position_embeddings {table} is not a square number of rows",
                              fix="use the config.json that ships with the checkpoint", key="model.checkpoint")
    if any(not 0 <= i < depth for i in deepstack) or list(deepstack) != sorted(set(deepstack)):
        raise CheckpointError(f"vision_config.deepstack_visual_indexes {list(deepstack)} are not increasing blocks "
                              f"in 0..{depth - 1}", fix="use the config.json that ships with the checkpoint",
                              key="model.checkpoint")
    return VisionDims(
        depth=depth, embed_dim=embed, heads=heads, head_dim=embed // heads, mlp_hidden=int(vis["intermediate_size"]),
        out_hidden=int(vis.get("out_hidden_size", text_hidden)), patch_size=int(vis.get("patch_size", 16)),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)), merge_size=int(vis.get("spatial_merge_size", 2)),
        in_chans=int(vis.get("in_channels", vis.get("in_chans", 3))),
        hidden_act=str(vis.get("hidden_act", "gelu_pytorch_tanh")), window=0, fullatt_blocks=tuple(range(depth)),
        deepstack=deepstack, pos_table_side=side)
