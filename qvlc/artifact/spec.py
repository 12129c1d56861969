"""What a runtime needs to know about each part of an artifact: the manifest's ``llm`` and ``visual`` sections,
and the special token ids a prompt is built from."""

from __future__ import annotations

from dataclasses import dataclass

from qvlc.precision import KvCache, Precision


@dataclass(frozen=True, kw_only=True)
class TokenIds:
    """The special token ids a prompt is built from (config.json), as a family reads them."""

    bos: int | None
    eos: int | None
    vision_start: int
    vision_end: int
    image: int
    video: int


@dataclass(frozen=True, kw_only=True)
class LlmSpec:
    """What a runtime needs to know about an LLM artifact: the manifest's ``llm`` section."""

    prefill_len: int
    max_context: int
    tp: int
    dtype: Precision
    hidden: int
    layers: int
    head_dim: int
    kv_heads_per_rank: int
    vocab: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    eos: int | None
    image_token: int
    video_token: int
    vision_start: int
    vision_end: int
    stop_tokens: tuple[str, ...]  # token strings that end a chat turn, besides eos (the family declares them)
    deepstack_layers: int = 0  # prefill input deepstack_embeds [k,1,S,H], added after layers 0..k-1 (Qwen3-VL)
    mrope_interleaved: bool = False  # cos/sin frequencies alternate t, h, w (Qwen3-VL) instead of sections
    prefill_chunk: int = 0  # T of the chunk graph (llm_chunk.onnx; 0: the artifact has none)
    kv_cache: KvCache = KvCache.FP  # int8: the cache is int8 with fp32 scales per layer, K/V, kv head and position


@dataclass(frozen=True, kw_only=True)
class VisualSpec:
    """What a runtime needs to know about a visual artifact: the manifest's ``visual`` section."""

    max_patches: int  # N
    patch_dim: int  # values per flattened patch (1176)
    head_dim: int  # Dv, width of cos/sin
    merge_size: int
    out_hidden: int  # width of the concatenated embedding
    chunk_widths: tuple[int, ...]  # widths of image_embeds_0 … image_embeds_{k-1}
    dtype: Precision
    rope_theta: float = 10000.0
    window: int = 0  # window attention: window side in merged tokens (0 = every block attends per frame)
    fullatt_blocks: tuple[int, ...] = ()  # blocks that attend per frame when window > 0
    deepstack: int = 0  # DeepStack embeddings the graph also outputs, each chunked like image_embeds (Qwen3-VL)
    pos_table_side: int = 0  # learned position table of side x side rows, gathered by pos_idx/pos_weight (0: none)

    @property
    def merge_unit(self) -> int:
        return self.merge_size**2

    @property
    def tokens(self) -> int:
        return self.max_patches // self.merge_unit

    @property
    def output_names(self) -> tuple[str, ...]:
        """image_embeds_0 … then, per DeepStack layer j, deepstack_embeds_{j}_0 …: the order of ``output_widths``."""
        n = len(self.chunk_widths)
        return tuple(f"image_embeds_{i}" for i in range(n)) + tuple(
            f"deepstack_embeds_{j}_{i}" for j in range(self.deepstack) for i in range(n))

    @property
    def output_widths(self) -> tuple[int, ...]:
        """Widths of every output: the embedding's chunks, then each DeepStack embedding's (the rows a runtime
        concatenates: [tokens, out_hidden * (1 + deepstack)])."""
        return tuple(self.chunk_widths) * (1 + self.deepstack)
