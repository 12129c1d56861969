"""Qwen2-VL's config.json → ``ModelDims`` (read without touching weights), with the checks its graphs need."""

from __future__ import annotations

from typing import Any, Callable

from qvlc.artifact.spec import TokenIds
from qvlc.errors import CheckpointError
from qvlc.models.common.dims import ModelDims, TextDims, VisionDims


def text_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 4.57 may nest the text fields under text_config; older files keep them flat."""
    return {**cfg, **(cfg.get("text_config") or {})}


def parse_dims(cfg: dict[str, Any], source: str, model_type: str, display: str,
               vision: Callable[[dict[str, Any], int], VisionDims]) -> ModelDims:
    """The text and token fields every Qwen-VL config shares; ``vision(vision_config, text hidden)`` reads the
    family's own vision fields. CheckpointError naming the field when one is missing or inconsistent."""
    if cfg.get("model_type") != model_type:
        raise CheckpointError(f"{source} has model_type {cfg.get('model_type')!r}, not {model_type!r}",
                              fix=f"point model.checkpoint at a {display} checkpoint", key="model.checkpoint")
    try:
        text = text_section(cfg)
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        section = tuple(int(x) for x in rope["mrope_section"])
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        head_dim = int(text.get("head_dim") or hidden // heads)  # Qwen3-VL states it (not always hidden / heads)
        dims = ModelDims(
            family=model_type,
            text=TextDims(
                hidden=hidden,
                intermediate=int(text["intermediate_size"]),
                layers=int(text["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(text.get("num_key_value_heads", heads)),
                head_dim=head_dim,
                vocab=int(text["vocab_size"]),
                rope_theta=float(text.get("rope_theta", 1000000.0)),
                mrope_section=section,  # type: ignore[arg-type]
                rms_eps=float(text.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                max_positions=int(text.get("max_position_embeddings", 32768)),
                mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            ),
            vision=vision(cfg["vision_config"], hidden),
            tokens=TokenIds(
                bos=cfg.get("bos_token_id"),
                eos=cfg.get("eos_token_id", text.get("eos_token_id")),  # Qwen3-VL: in text_config only
                vision_start=int(cfg["vision_start_token_id"]),
                vision_end=int(cfg["vision_end_token_id"]),
                image=int(cfg["image_token_id"]),
                video=int(cfg["video_token_id"]),
            ),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"{source} is missing or has a malformed {display} field ({exc!r})",
                              fix="use the config.json that ships with the checkpoint",
                              key="model.checkpoint") from exc
    if sum(section) * 2 != head_dim:
        raise CheckpointError(
            f"{source}: mrope_section {list(section)} sums to {sum(section)}, but head_dim/2 is {head_dim // 2}",
            fix="mrope_section must split head_dim/2 into (t, h, w) frequency sections", key="model.checkpoint")
    if heads % dims.text.kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {dims.text.kv_heads}",
            fix="use the config.json that ships with the checkpoint", key="model.checkpoint")
    return dims


def qwen2_vl_vision(vis: dict[str, Any], text_hidden: int) -> VisionDims:
    """Qwen2-VL's vision_config: embed_dim, mlp_ratio, hidden_size = output width; every block attends per frame."""
    heads, embed = int(vis["num_heads"]), int(vis["embed_dim"])
    depth = int(vis["depth"])
    return VisionDims(
        depth=depth, embed_dim=embed, heads=heads, head_dim=embed // heads,
        mlp_hidden=int(embed * float(vis.get("mlp_ratio", 4))), out_hidden=int(vis.get("hidden_size", text_hidden)),
        patch_size=int(vis.get("patch_size", 14)), temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        merge_size=int(vis.get("spatial_merge_size", 2)), in_chans=int(vis.get("in_chans", vis.get("in_channels", 3))),
        hidden_act=str(vis.get("hidden_act", "quick_gelu")), window=0, fullatt_blocks=tuple(range(depth)))
