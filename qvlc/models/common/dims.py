"""The numbers that shape every graph, as a family reads them from config.json (no torch, no weights)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlc.artifact.spec import TokenIds


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
    mrope_interleaved: bool = False  # Qwen3-VL: cos/sin frequencies alternate t, h, w


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
    deepstack: tuple[int, ...] = ()  # Qwen3-VL: blocks whose merged outputs are added after decoder layers 0..k-1
    pos_table_side: int = 0  # Qwen3-VL: the learned position table is side x side rows (0 = none)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: in_chans * temporal * patch * patch (1176 for Qwen2-VL)."""
        return self.in_chans * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.merge_size**2


@dataclass(frozen=True)
class ModelDims:
    family: str  # config.json model_type
    text: TextDims
    vision: VisionDims
    tokens: TokenIds


# Sizes no released Qwen-VL model comes near (the largest: 80 layers, hidden 8192, vocab 152k), checked before a
# meta model is built from config.json: 20000 layers once cost 90 s and 1.4 GB before the shape check refused them.
TEXT_BOUNDS = {"hidden": 1 << 16, "intermediate": 1 << 18, "layers": 512, "heads": 1024, "kv_heads": 1024,
               "head_dim": 1024, "vocab": 1 << 22, "max_positions": 1 << 24}
VISION_BOUNDS = {"depth": 512, "embed_dim": 1 << 15, "heads": 1024, "head_dim": 1024, "mlp_hidden": 1 << 17,
                 "out_hidden": 1 << 16, "patch_size": 64, "temporal_patch_size": 16, "merge_size": 8, "in_chans": 16}


def bound_problems(dims: ModelDims) -> list[str]:
    """Every dimension outside 1..its bound, as ``text.layers = 20000 (at most 512)``."""
    out = []
    for prefix, section, bounds in (("text", dims.text, TEXT_BOUNDS), ("vision", dims.vision, VISION_BOUNDS)):
        for name, limit in bounds.items():
            value = getattr(section, name)
            if not 1 <= value <= limit:
                out.append(f"{prefix}.{name} = {value} (qvlc takes 1..{limit})")
    return out
