"""Qwen2.5-VL's host side against transformers 4.57.6: the window order and M-RoPE positions with video seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.models import family
from qvlc.models.qwen2_5_vl.host import window_index

FAM = family("qwen2_5_vl")


@pytest.fixture(scope="module")
def model():
    from qvlc.checkpoint.hf_model import load_checkpoint

    return load_checkpoint(tiny_checkpoint(family=FAM)).model


@pytest.mark.parametrize("grids", [[[1, 4, 4]], [[1, 6, 10]], [[2, 8, 6], [1, 2, 2]], [[3, 10, 14], [1, 16, 8]],
                                   [[1, 2, 30]]])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_index_equals_transformers(model, grids, window):
    tower = model.model.visual
    tower.window_size = window * tower.spatial_merge_size * tower.patch_size
    want_index, want_cu = tower.get_window_index(torch.tensor(grids))
    index, lengths = window_index(grids, 2, window)
    np.testing.assert_array_equal(index, want_index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths * 4)]), want_cu)
    assert sorted(index.tolist()) == list(range(len(index)))  # a permutation


def test_windows_are_partial_and_several_on_the_tiny_grids():
    """The tiny default's validation grids give several windows per image and part-filled edge windows."""
    _, lengths = window_index([[1, 6, 10]], 2, 2)
    real = lengths[lengths > 0]
    assert len(real) > 1 and real.min() < real.max() == 4


@pytest.mark.parametrize("secs", [None, [1.0], [0.5], [2.5], [1.0, 3.0]])
def test_rope_index_with_video_seconds_equals_transformers(model, secs):
    dims = FAM.dims(FAM.shipped_config("tiny"))
    t = dims.tokens
    videos = [[3, 4, 6], [2, 2, 4]][: len(secs) if secs else 1]
    ids = [5, 6]
    for g in videos:
        ids += [t.vision_start] + [t.video] * (int(np.prod(g)) // 4) + [t.vision_end, 7]
    ids += [t.vision_start] + [t.image] * 4 + [t.vision_end, 8, 9]
    ids = np.array([0, 0] + ids)
    mask = np.array([0, 0] + [1] * (len(ids) - 2))
    kw = FAM.oracle_video_kwargs(secs)
    want, delta = model.model.get_rope_index(input_ids=torch.from_numpy(ids)[None],
                                             image_grid_thw=torch.tensor([[1, 4, 4]]),
                                             video_grid_thw=torch.tensor(videos),
                                             attention_mask=torch.from_numpy(mask)[None], **kw)
    got, got_delta = FAM.rope_index(ids, t, 2, dims.vision.tokens_per_second, image_grid_thw=[[1, 4, 4]],
                                    video_grid_thw=videos, second_per_grid_ts=secs, attention_mask=mask)
    np.testing.assert_array_equal(got, want[:, 0].numpy())
    assert got_delta == int(delta)


def test_video_time_steps_truncate_like_transformers():
    assert FAM.video_time_steps(3, 2, [0.5, 1.5, 2.0]) == [0.0, 2.0, 4.0]
    assert FAM.video_time_steps(1, 2, None) == [2.0]
    assert family("qwen2_vl").video_time_steps(2, 2, [0.5, 3.0]) == [1, 1]
