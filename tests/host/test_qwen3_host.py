"""Qwen3-VL's host-side numerics against transformers 4.57.6's own code: the learned position table interpolated to
every grid size (torch's float32 linspace reproduced bit for bit), and interleaved M-RoPE with image positions
(text-only prompts cannot tell interleaved from chunked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlc.artifact.spec import TokenIds
from qvlc.host.pos_table import interpolate, linspace_like_torch, pos_table_feeds
from qvlc.host.rope import get_rope_index, mrope_cos_sin

SIDE = 48  # the released models' table: 48 x 48 rows


def test_linspace_is_torchs_for_every_length():
    for n in range(1, 600):
        assert np.array_equal(linspace_like_torch(0, SIDE - 1, n), torch.linspace(0, SIDE - 1, n).numpy()), n


@pytest.fixture(scope="module")
def tower():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cfg = Qwen3VLVisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
                              num_position_embeddings=SIDE * SIDE, spatial_merge_size=2, patch_size=16,
                              deepstack_visual_indexes=[])
    torch.manual_seed(0)
    model = Qwen3VLVisionModel(cfg).eval()
    with torch.no_grad():
        model.pos_embed.weight.normal_()
    return model


def _check(tower, grids: list[tuple[int, int, int]]) -> None:
    with torch.no_grad():
        want = tower.fast_pos_embed_interpolate(torch.tensor(grids)).numpy()
    n = sum(t * h * w for t, h, w in grids)
    idx, wts = pos_table_feeds(grids, SIDE, 2, n + 8)  # padded: the rows past n index row 0 with weight 0
    got = interpolate(tower.pos_embed.weight.detach().numpy(), idx, wts)
    assert np.array_equal(got[:n], want), grids
    assert not wts[:, n:].any() and not idx[:, n:].any()


@pytest.mark.parametrize("axis", ["h", "w"])
def test_every_grid_size_against_transformers(tower, axis):
    """Every even side 2..300 (grids are multiples of the 2 x 2 merge), bitwise."""
    for size in range(2, 301, 2):
        _check(tower, [(1, size, 6) if axis == "h" else (1, 6, size)])


def test_several_grids_and_frames_against_transformers(tower):
    _check(tower, [(2, 10, 14), (1, 32, 8), (3, 4, 4)])


def _image_positions() -> np.ndarray:
    tokens = TokenIds(bos=None, eos=9, vision_start=1, vision_end=2, image=3, video=4)  # vision_start 1, image 3
    ids = [5, 6, 1] + [3] * 12 + [2, 7, 8, 1] + [3] * 6 + [2, 9]
    pos, _ = get_rope_index(np.array(ids), tokens, 2, image_grid_thw=[[1, 6, 8], [1, 4, 6]])
    return pos


@pytest.mark.parametrize("section", [[2, 3, 3], [3, 3, 2]])
def test_interleaved_mrope_against_transformers(section):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextRotaryEmbedding,
    )

    cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=5e6,
                            rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True})
    pos = _image_positions()
    assert len({tuple(p) for p in pos.T if len(set(p)) > 1}) > 4  # image rows: the axes differ
    cos_t, sin_t = Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32),
                                                   torch.from_numpy(pos)[:, None, :])
    cos, sin = mrope_cos_sin(pos, 16, 5e6, section, interleaved=True)
    assert np.abs(cos[0, 0] - cos_t[0].numpy()).max() <= 2e-7 and np.abs(sin[0, 0] - sin_t[0].numpy()).max() <= 2e-7
    chunked, _ = mrope_cos_sin(pos, 16, 5e6, section)
    assert np.abs(chunked - cos).max() > 1e-3  # with images, interleaving is a different table
