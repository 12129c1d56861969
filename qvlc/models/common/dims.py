"""The numbers that shape every graph, as a family reads them from config.json (no torch, no weights)."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_positions: int  # max_position_embeddings


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
    hidden_act: str
    window: int = 0  # window attention: window side in merged tokens (0 = none: every block attends per frame)
    fullatt_blocks: tuple[int, ...] = ()  # blocks attending per frame (all of them when window == 0)
    tokens_per_second: int = 0  # video: M-RoPE time positions per second (0 = one per temporal patch)

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
class ModelDims:
    family: str  # config.json model_type
    text: TextDims
    vision: VisionDims
    tokens: TokenIds
