"""The numbers that shape every Qwen2-VL graph, read from config.json without touching weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlc.errors import CheckpointError


@dataclass(frozen=True)
class TextDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    rms_eps: float
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionDims:
    depth: int
    embed_dim: int
    heads: int
    head_dim: int
    mlp_hidden: int
    out_hidden: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_chans: int

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: in_chans * temporal * patch * patch (1176 for Qwen2-VL)."""
        return self.in_chans * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.merge_size**2


@dataclass(frozen=True)
class TokenIds:
    bos: int | None
    eos: int | None
    vision_start: int
    vision_end: int
    image: int
    video: int


@dataclass(frozen=True)
class Qwen2VLDims:
    text: TextDims
    vision: VisionDims
    tokens: TokenIds

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "Qwen2VLDims":
        if cfg.get("model_type") != "qwen2_vl":
            raise CheckpointError(
                f"{source} has model_type {cfg.get('model_type')!r}, not 'qwen2_vl'",
                fix="point model.checkpoint at a Qwen2-VL checkpoint (Qwen2-VL-2B/7B-Instruct), or use 'tiny'",
                key="model.checkpoint",
            )
        # transformers >= 4.57 may nest the text fields under text_config; older files keep them flat.
        text = {**cfg, **(cfg.get("text_config") or {})}
        vis = cfg.get("vision_config") or {}
        try:
            rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
            section = tuple(int(x) for x in rope["mrope_section"])
            heads = int(text["num_attention_heads"])
            hidden = int(text["hidden_size"])
            head_dim = hidden // heads
            v_heads = int(vis["num_heads"])
            v_embed = int(vis["embed_dim"])
            dims = cls(
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
                ),
                vision=VisionDims(
                    depth=int(vis["depth"]),
                    embed_dim=v_embed,
                    heads=v_heads,
                    head_dim=v_embed // v_heads,
                    mlp_hidden=int(v_embed * float(vis.get("mlp_ratio", 4))),
                    out_hidden=int(vis.get("hidden_size", hidden)),
                    patch_size=int(vis.get("patch_size", 14)),
                    temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
                    merge_size=int(vis.get("spatial_merge_size", 2)),
                    in_chans=int(vis.get("in_chans", vis.get("in_channels", 3))),
                ),
                tokens=TokenIds(
                    bos=cfg.get("bos_token_id"),
                    eos=cfg.get("eos_token_id"),
                    vision_start=int(cfg["vision_start_token_id"]),
                    vision_end=int(cfg["vision_end_token_id"]),
                    image=int(cfg["image_token_id"]),
                    video=int(cfg["video_token_id"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{source} is missing or has a malformed Qwen2-VL field ({exc!r})",
                fix="use the config.json that ships with the checkpoint",
                key="model.checkpoint",
            ) from exc
        if sum(section) * 2 != head_dim:
            raise CheckpointError(
                f"{source}: mrope_section {list(section)} sums to {sum(section)}, but head_dim/2 is {head_dim // 2}",
                fix="mrope_section must split head_dim/2 into (t, h, w) frequency sections",
                key="model.checkpoint",
            )
        if heads % dims.text.kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {dims.text.kv_heads}",
                key="model.checkpoint",
            )
        return dims

    @classmethod
    def from_checkpoint(cls, folder: Path) -> "Qwen2VLDims":
        path = Path(folder) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"{folder} has no config.json", fix="point model.checkpoint at a Hugging Face model folder",
                key="model.checkpoint",
            ) from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})", key="model.checkpoint") from exc
        return cls.from_config_dict(cfg, source=str(path))
