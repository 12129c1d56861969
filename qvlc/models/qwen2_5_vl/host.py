"""Qwen2.5-VL's host side: the window order of the vision tower and the graph inputs in that order (NumPy only).

Reference: transformers 4.57.6 ``Qwen2_5_VisionTransformerPretrainedModel.get_window_index`` and ``forward``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from qvlc.host.vision import (
    fit_grids,
    padded_patches,
    segment_mask,
    vision_attention_mask,
    vision_cos_sin,
)


def window_index(grids: npt.ArrayLike, merge_size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, lengths): ``index[j]`` is the merged token (in prompt order) at window-order position j, and
    ``lengths`` the merged tokens of every window in order (zero-length windows included, as transformers pads).

    Per frame, the merged grid is padded to a multiple of ``window`` on the bottom and right and cut into
    ``window × window`` windows, row-major; frames and grids follow each other.
    """
    index, lengths, offset = [], [], 0
    for t, h, w in np.asarray(grids, dtype=np.int64).reshape(-1, 3):
        gh, gw = int(h) // merge_size, int(w) // merge_size
        ids = np.arange(int(t) * gh * gw).reshape(int(t), gh, gw)
        pad_h, pad_w = window - gh % window, window - gw % window  # a full extra window when divisible, as upstream
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        padded = np.pad(ids, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        blocks = padded.reshape(int(t), nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(int(t), nh * nw, -1)
        lengths.append((blocks != -100).sum(axis=2).reshape(-1))
        flat = blocks.reshape(-1)
        index.append(flat[flat != -100] + offset)
        offset += int(t) * gh * gw
    if not index:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(index).astype(np.int64), np.concatenate(lengths).astype(np.int64)


def window_feeds(pixel_values: np.ndarray, grids: npt.ArrayLike, n: int, patch_dim: int, head_dim: int,
                 merge_size: int, window: int, theta: float, dtype: npt.DTypeLike) -> tuple[dict, np.ndarray]:
    """The visual graph's inputs in window order, and ``order``: output row i (prompt order) is graph row order[i]."""
    arr = fit_grids(grids, n)
    unit = merge_size**2
    index, lengths = window_index(arr, merge_size, window)
    perm = (index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)  # patch rows in window order
    real = len(perm)
    pixels = padded_patches(pixel_values, arr, n, patch_dim, dtype)
    pixels[:real] = pixels[perm]
    cos, sin = vision_cos_sin(arr, head_dim, merge_size, n, theta, dtype)
    cos[:real], sin[:real] = cos[perm], sin[perm]
    feeds = {"pixel_values": pixels,
             # frames stay contiguous in window order (windows never cross a frame), so the per-frame mask holds
             "attention_mask": vision_attention_mask(arr, n),
             "window_attention_mask": segment_mask(lengths * unit, n),
             "cos": cos, "sin": sin}
    return feeds, np.argsort(index, kind="stable")
