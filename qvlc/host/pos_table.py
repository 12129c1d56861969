"""A learned position table interpolated to each grid on the host (Qwen3-VL's ``pos_embed``), NumPy only.

Reference: transformers 4.57.6 ``Qwen3VLVisionModel.fast_pos_embed_interpolate``. The table is a square of
``side x side`` rows (48 x 48 in the released models); for a grid of h x w patches every patch takes four rows
(the corners around its position, ``linspace(0, side - 1, h)`` by ``linspace(0, side - 1, w)``, corners aligned)
with bilinear weights; patches are listed in 2 x 2-merge order and repeated per frame. The graph gathers the four
rows and sums ``row_k * weight_k`` in k order; the host computes what depends on the grid: indices and weights.

torch's float32 ``linspace`` is neither NumPy's float32 one nor a float64 one rounded: it rounds the step to
float32, then forms ``start + step * i`` (first half) or ``end - step * (n - 1 - i)`` (second half) in double and
rounds once. ``linspace_like_torch`` does exactly that (tested for every length 2..599 against torch).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32) bit for bit."""
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = float(np.float32((end - start) / (steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))
    return out.astype(np.float32)


def grid_indices_weights(h: int, w: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """For an h x w grid (row-major): indices ``[4, h*w]`` into the side x side table (floor-floor, floor-ceil,
    ceil-floor, ceil-ceil) and their float32 weights ``[4, h*w]``, as transformers forms them."""
    hs, ws = linspace_like_torch(0, side - 1, h), linspace_like_torch(0, side - 1, w)
    hf, wf = hs.astype(np.int64), ws.astype(np.int64)  # .int(): truncation (the values are >= 0)
    hc, wc = np.minimum(hf + 1, side - 1), np.minimum(wf + 1, side - 1)
    dh, dw = hs - hf.astype(np.float32), ws - wf.astype(np.float32)  # float32
    one = np.float32(1)
    idx = np.stack([(hf[:, None] * side + wf[None]).ravel(), (hf[:, None] * side + wc[None]).ravel(),
                    (hc[:, None] * side + wf[None]).ravel(), (hc[:, None] * side + wc[None]).ravel()])
    wts = np.stack([((one - dh)[:, None] * (one - dw)[None]).ravel(), ((one - dh)[:, None] * dw[None]).ravel(),
                    (dh[:, None] * (one - dw)[None]).ravel(), (dh[:, None] * dw[None]).ravel()])
    return idx, wts.astype(np.float32)


def pos_table_feeds(grids: npt.ArrayLike, side: int, merge_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's ``pos_idx`` int64 ``[4, n]`` and ``pos_weight`` float32 ``[4, n]`` for images/videos ``grids``
    (rows (t, h, w), in order), each grid's patches in 2 x 2-merge order and repeated per frame; rows past the real
    patches index row 0 with weight 0."""
    idx_out = np.zeros((4, n), dtype=np.int64)
    wts_out = np.zeros((4, n), dtype=np.float32)
    at = 0
    for t, h, w in np.asarray(grids, dtype=np.int64).reshape(-1, 3):
        idx, wts = grid_indices_weights(int(h), int(w), side)
        m = merge_size
        order = np.arange(h * w).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
        count = int(t * h * w)
        idx_out[:, at:at + count] = np.tile(idx[:, order], (1, int(t)))
        wts_out[:, at:at + count] = np.tile(wts[:, order], (1, int(t)))
        at += count
    return idx_out, wts_out


def interpolate(table: np.ndarray, idx: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """What the graph computes from the feeds (a reference for tests): ``sum_k table[idx[k]] * wts[k]``, k in
    order, in the table's dtype."""
    out = table[idx[0]] * wts[0][:, None].astype(table.dtype)
    for k in range(1, 4):
        out = out + table[idx[k]] * wts[k][:, None].astype(table.dtype)
    return out
