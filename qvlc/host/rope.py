"""M-RoPE on the host: position ids and the merged cos/sin tables the LLM graphs take (NumPy only).

Reference: transformers 4.57.6 ``Qwen2VLModel.get_rope_index`` (and Qwen2.5-VL's, which differs only in the time
positions of video frames: a family passes them as ``video_time_steps``), ``Qwen2VLRotaryEmbedding`` and
``apply_multimodal_rotary_pos_emb``. Everything here is for one sequence (batch size 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from qvlc.artifact.spec import TokenIds
from qvlc.errors import QvlcError

__all__ = [
    "get_rope_index",
    "mrope_inv_freq",
    "mrope_cos_sin",
    "decode_position",
    "decode_cos_sin",
]


def _as_grids(grids: npt.ArrayLike | None, name: str) -> np.ndarray | None:
    if grids is None:
        return None
    arr = np.asarray(grids, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise QvlcError(f"{name} must have shape (n, 3) of (t, h, w) patch counts, got shape {arr.shape}",
                        key=name)
    return arr


def get_rope_index(
    input_ids: npt.ArrayLike,
    tokens: TokenIds,
    merge_size: int,
    image_grid_thw: npt.ArrayLike | None = None,
    video_grid_thw: npt.ArrayLike | None = None,
    attention_mask: npt.ArrayLike | None = None,
    video_time_steps: Sequence[float] | None = None,
) -> tuple[np.ndarray, int]:
    """M-RoPE position ids ``int64 [3, S]`` and ``rope_delta`` for one (possibly left-padded) sequence.

    Same results as transformers 4.57.6 ``model.model.get_rope_index`` at batch size 1: text tokens advance all
    three axes together; each image/video (announced by ``vision_start`` followed by an image/video token) takes
    (t, h/merge, w/merge) grid positions offset by the running text position; the next text starts at the
    largest position so far + 1. Masked-out slots (``attention_mask == 0``) get position 1.
    ``rope_delta = max(position) + 1 - S`` with S the padded length; with no grids at all and no mask,
    positions are ``arange(S)`` and the delta is 0. Grids are (t, h, w) in patches before merging, in prompt order.
    ``video_time_steps[i]``: the time position between consecutive temporal patches of video i (default 1, as
    Qwen2-VL; Qwen2.5-VL passes ``int(second_per_grid_t) * tokens_per_second``); positions are truncated to
    integers as transformers does.
    Raises ``QvlcError`` for prompts transformers would mis-handle: a missing grid row, or a pad-token run whose
    length is not t*h*w/merge^2.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise QvlcError(f"input_ids must be 1-D (one sequence), got shape {ids.shape}", key="input_ids")
    seq_len = int(ids.shape[0])
    mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask is not None and mask.shape != ids.shape:
        raise QvlcError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}",
                        key="attention_mask")
    images = _as_grids(image_grid_thw, "image_grid_thw")
    videos = _as_grids(video_grid_thw, "video_grid_thw")

    if images is None and videos is None:
        if mask is None:
            return np.broadcast_to(np.arange(seq_len, dtype=np.int64), (3, seq_len)).copy(), 0
        pos = np.cumsum(mask) - 1
        pos[mask == 0] = 1
        return np.broadcast_to(pos, (3, seq_len)).copy(), int(pos.max()) + 1 - seq_len

    keep = np.ones(seq_len, dtype=bool) if mask is None else mask == 1
    real = ids[keep]
    chunks = _position_chunks(real, tokens, merge_size, images, videos, video_time_steps)
    if not chunks:
        raise QvlcError("the sequence has no real token (attention_mask is all 0)", key="attention_mask")
    llm = np.concatenate(chunks, axis=1)
    positions = np.ones((3, seq_len), dtype=np.int64)
    positions[:, keep] = llm
    return positions, int(llm.max()) + 1 - seq_len


def _announced(real: np.ndarray, tokens: TokenIds, images: np.ndarray | None,
               videos: np.ndarray | None) -> tuple[int, int]:
    """How many images and videos the prompt announces (vision_start + pad token); refuses missing grid rows."""
    starts = np.flatnonzero(real[:-1] == tokens.vision_start)  # a trailing vision_start announces nothing
    following = real[starts + 1]
    n_images = int((following == tokens.image).sum())
    n_videos = int((following == tokens.video).sum())
    for grids, count, what in ((images, n_images, "image"), (videos, n_videos, "video")):
        have = 0 if grids is None else grids.shape[0]
        if count > have:
            raise QvlcError(
                f"the prompt announces {count} {what}(s) but only {have} {what} grid(s) were given",
                fix=f"pass one (t, h, w) row in {what}_grid_thw per {what} in the prompt, in prompt order",
                key=f"{what}_grid_thw",
            )
    return n_images, n_videos


def _text_chunk(length: int, start: int) -> np.ndarray:
    return np.broadcast_to(np.arange(length, dtype=np.int64) + start, (3, length))


def _position_chunks(real: np.ndarray, tokens: TokenIds, merge_size: int, images: np.ndarray | None,
                     videos: np.ndarray | None, video_time_steps: Sequence[float] | None) -> list[np.ndarray]:
    """The [3, n] position chunks of the real tokens: text runs and vision grids in prompt order."""
    n_images, n_videos = _announced(real, tokens, images, videos)
    chunks: list[np.ndarray] = []
    st = next_pos = image_index = video_index = 0
    end = len(real) + 1
    image_at = np.flatnonzero(real == tokens.image)
    video_at = np.flatnonzero(real == tokens.video)
    for _ in range(n_images + n_videos):
        ed_image = _first_at_or_after(image_at, st, end) if image_index < n_images else end
        ed_video = _first_at_or_after(video_at, st, end) if video_index < n_videos else end
        if ed_image == end and ed_video == end:
            raise QvlcError(
                "the prompt announces more images/videos (vision_start + pad token) than it has pad-token runs",
                fix="each image/video needs t*h*w/merge_size^2 pad tokens right after its vision_start token",
                key="input_ids",
            )
        if ed_image < ed_video:
            t, h, w = (int(x) for x in images[image_index])  # type: ignore[index]
            image_index += 1
            ed, kind, pad, step = ed_image, "image", tokens.image, 1.0
        else:
            t, h, w = (int(x) for x in videos[video_index])  # type: ignore[index]
            video_index += 1
            ed, kind, pad = ed_video, "video", tokens.video
            step = 1.0 if video_time_steps is None else float(video_time_steps[video_index - 1])
        gt, gh, gw = t, h // merge_size, w // merge_size
        if min(gt, gh, gw) < 1:
            raise QvlcError(
                f"grid (t={t}, h={h}, w={w}) has no merged patch (merge_size {merge_size})",
                fix="grids are (t, h, w) in patches before merging; h and w are multiples of merge_size",
                key=f"{kind}_grid_thw",
            )
        _check_pad_run(real, ed, gt * gh * gw, pad, (t, h, w))
        chunks.append(_text_chunk(ed - st, next_pos))
        t_pos = (np.arange(gt, dtype=np.float64) * step).astype(np.int64)  # .long() truncates, as transformers
        grid = np.stack(
            [a.ravel() for a in np.meshgrid(t_pos, np.arange(gh), np.arange(gw), indexing="ij")]
        ).astype(np.int64)
        chunks.append(grid + (ed - st) + next_pos)
        next_pos = int(chunks[-1].max()) + 1
        st = ed + gt * gh * gw
    if st < len(real):
        chunks.append(_text_chunk(len(real) - st, next_pos))
    return chunks


def _check_pad_run(real: np.ndarray, start: int, length: int, pad: int, grid: tuple[int, int, int]) -> None:
    """The grid must cover exactly the run of pad tokens that starts at ``start``."""
    run = real[start:start + length + 1] == pad
    found = int(np.argmin(run)) if not run.all() else len(run)
    if found != length:
        raise QvlcError(
            f"grid (t, h, w) = {grid} needs {length} pad tokens, but the prompt has a run of {found}"
            + (" or more" if found > length else ""),
            fix="each image/video needs exactly t*h*w/merge_size^2 pad tokens after its vision_start token, "
            "and its grid row in prompt order",
            key="input_ids",
        )


def _first_at_or_after(where: np.ndarray, st: int, missing: int) -> int:
    """First index in sorted ``where`` that is >= st, or ``missing``."""
    i = int(np.searchsorted(where, st))
    return int(where[i]) if i < len(where) else missing


def mrope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``theta^(-2k/D)`` for k < D/2, float32 ``[D/2]``, as transformers' default RoPE init.

    The exponent is formed in fp32 like transformers; the power is taken in fp64 and rounded once to fp32
    (torch's vectorised fp32 pow may land 1 ulp away on a few entries), then the reciprocal is taken in fp32.
    """
    if head_dim <= 0 or head_dim % 2:
        raise QvlcError(f"rotary head_dim must be a positive even number, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def _merge_sections(per_axis: np.ndarray, mrope_section: Sequence[int]) -> np.ndarray:
    """``[3, S, D]`` → ``[S, D]``: channel section i comes from axis i % 3, sections = mrope_section * 2."""
    sections = list(mrope_section) * 2
    if sum(sections) != per_axis.shape[-1]:
        raise QvlcError(
            f"mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, but head_dim/2 is "
            f"{per_axis.shape[-1] // 2}"
        )
    bounds = np.cumsum([0, *sections])
    return np.concatenate(
        [per_axis[i % 3, :, bounds[i]:bounds[i + 1]] for i in range(len(sections))], axis=-1
    )


def _interleave(freqs: np.ndarray, mrope_section: Sequence[int]) -> np.ndarray:
    """``[3, S, D/2]`` → ``[S, D/2]`` as Qwen3-VL's ``apply_interleaved_mrope``: frequency k comes from axis
    t, except k = 1, 4, 7, … (h) below 3·section[1] and k = 2, 5, 8, … (w) below 3·section[2]."""
    if sum(mrope_section) != freqs.shape[-1]:
        raise QvlcError(f"mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, but head_dim/2 is "
                        f"{freqs.shape[-1]}")
    out = freqs[0].copy()
    for axis in (1, 2):
        idx = slice(axis, mrope_section[axis] * 3, 3)
        out[..., idx] = freqs[axis, ..., idx]
    return out


def mrope_cos_sin(
    positions: npt.ArrayLike,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int],
    dtype: npt.DTypeLike = np.float32,
    interleaved: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Merged M-RoPE tables ``cos, sin`` of shape ``[1, 1, S, D]`` for ``positions`` ``[3, S]``.

    Per axis the angle ``pos · inv_freq`` is formed in fp32 (as transformers) and duplicated to width D; channel
    section i of ``mrope_section * 2`` is taken from axis ``i % 3`` — or, ``interleaved`` (Qwen3-VL), the
    frequencies alternate t, h, w within the sections before the duplication. cos/sin are evaluated in fp64 on
    the fp32 angles and rounded to fp32, then cast to ``dtype`` last.
    """
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[0] != 3:
        raise QvlcError(f"positions must have shape (3, S), got {pos.shape}")
    inv_freq = mrope_inv_freq(head_dim, theta)
    freqs = pos.astype(np.float32)[:, :, None] * inv_freq[None, None, :]  # [3, S, D/2], fp32
    if interleaved:
        merged = _interleave(freqs, mrope_section)
        angles = np.concatenate([merged, merged], axis=-1).astype(np.float64)
    else:
        angles = _merge_sections(np.concatenate([freqs, freqs], axis=-1), mrope_section).astype(np.float64)
    cos = np.cos(angles).astype(np.float32).astype(dtype)
    sin = np.sin(angles).astype(np.float32).astype(dtype)
    return cos[None, None], sin[None, None]


def decode_position(prefill_len: int, step: int, rope_delta: int) -> int:
    """Position of the token fed at decode step ``step`` (0 = first token after prefill).

    transformers uses ``cache_position + rope_delta`` with ``cache_position = prefill_len + step``; ``prefill_len``
    is the padded prefill length S (left pads included).
    """
    return int(prefill_len) + int(step) + int(rope_delta)


def decode_cos_sin(
    position: int,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int],
    dtype: npt.DTypeLike = np.float32,
    interleaved: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` ``[1, 1, 1, D]`` for one decode token (a text token: same position on all three axes)."""
    return mrope_cos_sin(np.full((3, 1), position, dtype=np.int64), head_dim, theta, mrope_section, dtype,
                         interleaved)
