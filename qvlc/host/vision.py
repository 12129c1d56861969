"""Host inputs of the visual graph: rotary cos/sin and the block-diagonal attention mask (NumPy only).

Reference: transformers 4.57.6 ``Qwen2VisionTransformerPretrainedModel.rot_pos_emb`` and the ``cu_seqlens``
built in its ``forward``. Grids are (t, h, w) in patches before merging, concatenated in order; the graph has a
static patch count N and the rows past the real patches are padding.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from qvlc.errors import QvlcError

__all__ = ["fit_grids", "padded_patches", "vision_cos_sin", "vision_attention_mask", "vision_inv_freq",
           "segment_mask"]


def fit_grids(grids: npt.ArrayLike, n: int) -> np.ndarray:
    """Check that ``grids`` fit in ``n`` patches; returns them as int64 ``[k, 3]``.

    Raises ``QvlcError`` (key ``export.max_patches``) when the total patch count ``sum(t*h*w)`` exceeds ``n``.
    """
    arr = np.asarray(grids, dtype=np.int64)
    if arr.size == 0:
        arr = arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise QvlcError(f"grids must have shape (k, 3) of (t, h, w) rows, got shape {arr.shape}", key="grid_thw")
    if (arr < 1).any():
        raise QvlcError(f"grid dimensions must be positive, got {arr.tolist()}", key="grid_thw")
    total = int(arr.prod(axis=1).sum())
    if total > n:
        raise QvlcError(
            f"the images/videos need {total} patches (grids t*h*w: {arr.tolist()}), "
            f"but the visual graph holds only {n}",
            fix=f"compile the visual part with export.max_patches >= {-(-total // 16) * 16}, "
            "or resize the input smaller (lower max_pixels) so it fits",
            key="export.max_patches",
        )
    return arr


def padded_patches(pixel_values: np.ndarray, grids: npt.ArrayLike, n: int, patch_dim: int,
                   dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """Real patches ``[sum t*h*w, patch_dim]`` → ``[n, patch_dim]`` with zero rows past them.

    Raises ``QvlcError`` when the patches exceed ``n`` or do not match the grids.
    """
    arr = fit_grids(grids, n)
    rows = int(arr.prod(axis=1).sum())
    pixel_values = np.asarray(pixel_values)
    if pixel_values.ndim != 2 or pixel_values.shape != (rows, patch_dim):
        raise QvlcError(f"pixel_values has shape {list(pixel_values.shape)}, but grids {arr.tolist()} need "
                        f"[{rows}, {patch_dim}]", fix="pass the patches and grid_thw from the same preprocessing",
                        key="pixel_values")
    out = np.zeros((n, patch_dim), dtype=dtype)
    out[:rows] = pixel_values
    return out


def vision_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Inverse frequencies of the vision rotary, float32 ``[head_dim/4]`` (``VisionRotaryEmbedding(head_dim/2)``).

    Exponent in fp32 as transformers; the power in fp64 rounded once to fp32; reciprocal in fp32.
    """
    dim = head_dim // 2
    if head_dim % 4:
        raise QvlcError(f"vision head_dim must be a multiple of 4, got {head_dim}")
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def _patch_rows_cols(t: int, h: int, w: int, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every patch of one grid, in merge-block order, repeated for each of the t frames."""
    if h % merge_size or w % merge_size:
        raise QvlcError(
            f"grid (t={t}, h={h}, w={w}): h and w must be multiples of merge_size {merge_size}", key="grid_thw"
        )
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))

    def block_order(a: np.ndarray) -> np.ndarray:
        return a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3).ravel()

    return np.tile(block_order(rows), t), np.tile(block_order(cols), t)


def vision_cos_sin(
    grids: npt.ArrayLike,
    head_dim: int,
    merge_size: int,
    n: int,
    theta: float = 10000.0,
    dtype: npt.DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Vision rotary ``cos, sin``, each ``[N, Dv]`` (Dv = vision head_dim), for ``grids`` padded to ``n`` rows.

    Row r holds angles ``[row·f | col·f | row·f | col·f]`` (f = :func:`vision_inv_freq`, products in fp32 as
    transformers) for patch r in 2x2 merge-block order; padding rows have angle 0 (cos 1, sin 0). cos/sin are
    evaluated in fp64 on the fp32 angles, rounded to fp32, then cast to ``dtype``.
    """
    arr = fit_grids(grids, n)
    inv_freq = vision_inv_freq(head_dim, theta)
    rows_cols = [_patch_rows_cols(int(t), int(h), int(w), merge_size) for t, h, w in arr]
    rows = np.concatenate([r for r, _ in rows_cols] + [np.zeros(0, np.int64)])
    cols = np.concatenate([c for _, c in rows_cols] + [np.zeros(0, np.int64)])
    angles = np.zeros((n, head_dim // 2), dtype=np.float32)
    quarter = inv_freq.shape[0]
    angles[: len(rows), :quarter] = rows.astype(np.float32)[:, None] * inv_freq[None, :]
    angles[: len(cols), quarter:] = cols.astype(np.float32)[:, None] * inv_freq[None, :]
    full = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    cos = np.cos(full).astype(np.float32).astype(dtype)
    sin = np.sin(full).astype(np.float32).astype(dtype)
    return cos, sin


def vision_attention_mask(grids: npt.ArrayLike, n: int) -> np.ndarray:
    """Attention mask ``bool [1, N, N]`` (True = may attend) for ``grids`` padded to ``n`` patches.

    Block-diagonal with one block per frame: every temporal patch of every grid is its own segment of h*w
    patches (transformers' ``cu_seqlens``). Each padding row attends only to itself, so its softmax stays finite.
    The graph input is bool; cast on the host if an exporter needs another dtype.
    """
    arr = fit_grids(grids, n)
    return segment_mask(np.repeat(arr[:, 1] * arr[:, 2], arr[:, 0]), n)


def segment_mask(segments: npt.ArrayLike, n: int) -> np.ndarray:
    """bool ``[1, n, n]``: block-diagonal over consecutive segments of the given lengths (zero-length segments
    allowed), then each of the remaining padding rows attends only to itself."""
    segments = np.asarray(segments, dtype=np.int64)
    total = int(segments.sum())
    seg_id = np.concatenate([np.repeat(np.arange(len(segments)), segments), len(segments) + np.arange(n - total)])
    return (seg_id[:, None] == seg_id[None, :])[None]
