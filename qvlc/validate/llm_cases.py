"""The prompts the LLM graphs are proven on, sized from S so every case fits whatever S a config compiles."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qvlc.models.common.dims import ModelDims
from qvlc.runtime.llm import Media
from qvlc.runtime.prompt import split_deepstack

VIDEO_SECOND_PER_GRID = 2.5  # not a whole number: Qwen2.5-VL truncates it to 2 s before scaling (its positions)


@dataclass
class LlmCase:
    name: str
    ids: np.ndarray  # real tokens, unpadded, int64 [n]
    media: Media  # grids and rows of its images and videos (rows: random, or from the oracle's vision tower)
    pixel_values: np.ndarray | None = None  # generation: the oracle computes the image rows from these


def _text(rng: np.random.Generator, n: int, dims: ModelDims) -> list[int]:
    first_special = min(dims.tokens.vision_start, dims.tokens.image, dims.tokens.bos or 1 << 62)
    return rng.integers(0, min(first_special, dims.text.vocab), size=n).tolist()


def _grid_for(tokens: int, aspect: float, merge: int, t: int = 1) -> tuple[int, int, int]:
    """A grid of ``t`` temporal patches with about ``tokens`` merged tokens each at roughly ``aspect`` (w / h)."""
    a = max(1, int(round((tokens / aspect) ** 0.5)))
    b = max(1, tokens // a)
    return (t, a * merge, b * merge)


def _span(dims: ModelDims, grid: tuple[int, int, int], pad: int, frames_as_grids: bool = False) -> list[int]:
    """One vision span; with ``frames_as_grids`` (Qwen3-VL) a video is one span per temporal patch, each after two
    text tokens standing for its timestamp (the processor writes "<t seconds>" there)."""
    t, h, w = grid
    n = t * h * w // dims.vision.merge_unit
    if frames_as_grids and pad == dims.tokens.video:
        stamp = [3, 7]  # plain text ids below every special token
        return [x for _ in range(t) for x in stamp + [dims.tokens.vision_start] + [pad] * (n // t)
                + [dims.tokens.vision_end]]
    return [dims.tokens.vision_start] + [pad] * n + [dims.tokens.vision_end]


def _prompt(rng, dims: ModelDims, items: list[tuple[tuple[int, int, int], int]], total: int,
            frames_as_grids: bool = False) -> list[int]:
    """Text, vision spans (grid, pad token) separated by text, text: exactly ``total`` tokens."""
    spans = [_span(dims, g, pad, frames_as_grids) for g, pad in items]
    text = total - sum(map(len, spans))
    if text < len(items) + 1:
        raise ValueError(f"{total} tokens cannot hold {items}")  # a bug in this file: cases are sized from S
    cuts = np.sort(rng.choice(np.arange(1, text), size=len(items), replace=False))
    pieces = np.split(np.array(_text(rng, text, dims)), cuts)
    ids: list[int] = []
    for piece, span in zip(pieces, spans + [[]]):
        ids += piece.tolist() + span
    return ids


def _rows(rng, ids: np.ndarray, token: int, hidden: int, std: float) -> np.ndarray | None:
    n = int((ids == token).sum())
    return (rng.standard_normal((n, hidden)) * std).astype(np.float32) if n else None


def build_cases(dims: ModelDims, prefill_len: int, seed: int, embed_std: float, frames_as_grids: bool = False,
                prefill_chunk: int = 0) -> list[LlmCase]:
    """Prompts of different lengths with image and video spans; all but the full one are left-padded to S. The
    image of ``one_image_half`` comes as pixels (its rows from the transformers vision tower, the path users run);
    the other vision rows are random at the embedding table's scale. With ``prefill_chunk`` T, three more
    (``chunk_cases``), drawn from a generator of their own so the others stay the same."""
    rng = np.random.default_rng(seed)
    S, m, tk = prefill_len, dims.vision.merge_size, dims.tokens
    cases = [LlmCase("text_short", np.array(_text(rng, max(8, S // 4), dims)), Media())]
    g1 = _grid_for(max(2, S // 8), 1.5, m)
    g2, g3 = _grid_for(max(2, S // 10), 0.5, m), _grid_for(max(3, S // 6), 2.0, m)
    video = _grid_for(max(2, S // 16), 1.0, m, t=3)
    for name, items, total in (("one_image_half", [(g1, tk.image)], S // 2),
                               ("two_images_full", [(g2, tk.image), (g3, tk.image)], S),
                               ("image_and_video", [(g2, tk.image), (video, tk.video)], S * 3 // 4)):
        ids = np.array(_prompt(rng, dims, items, total, frames_as_grids))
        media = _media(rng, dims, ids, items, embed_std)
        pixels = None
        if name == "one_image_half":
            patches = g1[0] * g1[1] * g1[2]
            pixels = rng.uniform(-1.8, 2.1, size=(patches, dims.vision.patch_dim)).astype(np.float32)  # normalized
            media = replace(media, image_embeds=None, image_deepstack=None)
        cases.append(LlmCase(name, ids, media, pixels))
    return cases + (chunk_cases(dims, S, prefill_chunk, seed, embed_std) if prefill_chunk else [])


def chunk_cases(dims: ModelDims, prefill_len: int, chunk: int, seed: int, embed_std: float) -> list[LlmCase]:
    """The chunk graph's edges: ``chunk_short`` (half a chunk: one call, mostly padding), ``chunks_exact`` (2T
    tokens with an image: no padding), ``image_across_chunks`` (more than two chunks' worth up to S - T/2, its
    image's rows split between the first and second chunk)."""
    rng = np.random.default_rng([seed, chunk])
    S, T, m, tk = prefill_len, chunk, dims.vision.merge_size, dims.tokens
    cases = [LlmCase("chunk_short", np.array(_text(rng, max(1, T // 2), dims)), Media())]
    exact = [(_grid_for(max(2, T // 4), 1.0, m), tk.image)]
    ids = np.array(_prompt(rng, dims, exact, 2 * T))
    cases.append(LlmCase("chunks_exact", ids, _media(rng, dims, ids, exact, embed_std)))
    n = min(2 * T + T // 2, S - T // 2)
    grid = _grid_for(max(2, T // 4), 0.5, m)
    span = _span(dims, grid, tk.image)
    boundary = T - (-(-n // T) * T - n)  # prompt index of the second chunk's first row (the first is left-padded)
    before = max(1, boundary - (len(span) - 2) // 2 - 1)
    ids = np.array(_text(rng, before, dims) + span + _text(rng, n - before - len(span), dims))
    image = np.flatnonzero(ids == tk.image)
    if not image[0] < boundary <= image[-1]:
        raise ValueError(f"image rows {image[0]}..{image[-1]} do not cross index {boundary}")  # a bug in this file
    cases.append(LlmCase("image_across_chunks", ids, _media(rng, dims, ids, [(grid, tk.image)], embed_std)))
    return cases


def _media(rng, dims: ModelDims, ids: np.ndarray, items: list[tuple[tuple[int, int, int], int]],
           embed_std: float) -> Media:
    """Grids of a prompt's vision ``items`` (grid, pad token) and random rows (DeepStack ones too) for their
    positions, at the embedding table's scale."""
    tk, H, k = dims.tokens, dims.text.hidden, len(dims.vision.deepstack)
    images = np.array([g for g, pad in items if pad == tk.image], dtype=np.int64)
    videos = np.array([g for g, pad in items if pad == tk.video], dtype=np.int64).reshape(-1, 3)
    return Media(images, _rows(rng, ids, tk.image, H, embed_std), videos if len(videos) else None,
                 _rows(rng, ids, tk.video, H, embed_std),
                 (VIDEO_SECOND_PER_GRID,) * len(videos) if len(videos) else None,
                 _deep(rng, ids, tk.image, H, embed_std, k), _deep(rng, ids, tk.video, H, embed_std, k))


def _deep(rng, ids: np.ndarray, token: int, hidden: int, std: float, layers: int) -> np.ndarray | None:
    """Random DeepStack rows [layers, n, H] for a token's n positions (None without DeepStack or positions)."""
    rows = [_rows(rng, ids, token, hidden, std) for _ in range(layers)]
    return np.stack(rows) if layers and rows[0] is not None else None


def with_image_rows(case: LlmCase, rows: np.ndarray | None, hidden: int) -> LlmCase:
    """The tower's rows [n, H × (1 + k)] (``Family.tower_rows``): the embedding, then k DeepStack embeddings."""
    rows, deep = split_deepstack(rows, hidden)
    return replace(case, media=replace(case.media, image_embeds=rows, image_deepstack=deep))
