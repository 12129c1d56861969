"""qvlc.host.vision against transformers 4.57.6: vision rotary cos/sin, the per-frame mask, the patch budget."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    VisionRotaryEmbedding,
)

from qvlc.checkpoint.tiny import shipped_config
from qvlc.errors import QvlcError
from qvlc.host.vision import (
    fit_grids,
    vision_attention_mask,
    vision_cos_sin,
    vision_inv_freq,
)
from qvlc.models.qwen2_vl import FAMILY as QWEN2_VL

GRIDS = {
    "one_image": [[1, 4, 6]],
    "images": [[1, 2, 2], [1, 6, 4], [1, 4, 8]],
    "video_t2": [[2, 4, 6]],
    "images_and_videos": [[1, 4, 4], [2, 2, 6], [1, 6, 2], [3, 2, 2]],
}


def padded_n(grids: list[list[int]], extra: int = 16) -> int:
    total = int(np.prod(grids, axis=1).sum())
    return -(-total // 16) * 16 + extra


def reference_tables(rotary: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin exactly as Qwen2VisionTransformerPretrainedModel.forward builds them from rot_pos_emb."""
    emb = torch.cat((rotary, rotary), dim=-1)
    return emb.cos().numpy(), emb.sin().numpy()


def run_visual(ck, grids: list[list[int]]) -> dict[str, torch.Tensor]:
    """Run the stock vision tower; return the cu_seqlens and cos/sin its first block receives."""
    seen: dict[str, torch.Tensor] = {}

    def grab(_module, _args, kwargs):
        seen["cu_seqlens"] = kwargs["cu_seqlens"].clone()
        seen["cos"], seen["sin"] = (x.clone() for x in kwargs["position_embeddings"])

    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), ck.dims.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    hook = ck.visual.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ck.visual(pixels, grid_thw=grid)
    finally:
        hook.remove()
    return seen


# ---- cos/sin ----------------------------------------------------------------------------------------------------

def test_inv_freq_matches_transformers(ck):
    np.testing.assert_array_equal(
        vision_inv_freq(ck.dims.vision.head_dim), ck.visual.rotary_pos_emb.inv_freq.numpy()
    )
    big = QWEN2_VL.dims(shipped_config("qwen2_vl_2b")).vision
    np.testing.assert_array_max_ulp(
        vision_inv_freq(big.head_dim), VisionRotaryEmbedding(big.head_dim // 2).inv_freq.numpy(), maxulp=1
    )


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_vision_cos_sin_matches_rot_pos_emb(ck, case):
    grids = GRIDS[case]
    vis = ck.dims.vision
    n = padded_n(grids)
    total = int(np.prod(grids, axis=1).sum())
    want_cos, want_sin = reference_tables(ck.visual.rot_pos_emb(torch.tensor(grids)))

    cos, sin = vision_cos_sin(grids, vis.head_dim, vis.merge_size, n)
    assert cos.shape == sin.shape == (n, vis.head_dim) and cos.dtype == sin.dtype == np.float32
    np.testing.assert_allclose(cos[:total], want_cos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin[:total], want_sin, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(cos[total:], 1.0)
    np.testing.assert_array_equal(sin[total:], 0.0)


@pytest.mark.parametrize("case", ["images", "images_and_videos"])
def test_vision_cos_sin_matches_the_forward_pass(ck, case):
    """The tables the stock vision forward really hands to its blocks, not just rot_pos_emb."""
    grids = GRIDS[case]
    vis = ck.dims.vision
    seen = run_visual(ck, grids)
    total = seen["cos"].shape[0]
    cos, sin = vision_cos_sin(grids, vis.head_dim, vis.merge_size, padded_n(grids))
    np.testing.assert_allclose(cos[:total], seen["cos"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin[:total], seen["sin"].numpy(), rtol=0, atol=1e-6)


def test_vision_cos_sin_at_2b_size():
    """Dv = 80 and a large grid (angles up to ~100 rad) against rot_pos_emb with the 2B rotary."""
    vis = QWEN2_VL.dims(shipped_config("qwen2_vl_2b")).vision
    grids = [[1, 72, 100], [2, 10, 14]]
    stub = SimpleNamespace(spatial_merge_size=vis.merge_size, rotary_pos_emb=VisionRotaryEmbedding(vis.head_dim // 2))
    want_cos, want_sin = reference_tables(Qwen2VisionTransformerPretrainedModel.rot_pos_emb(stub, torch.tensor(grids)))
    total = want_cos.shape[0]
    cos, sin = vision_cos_sin(grids, vis.head_dim, vis.merge_size, padded_n(grids))
    np.testing.assert_allclose(cos[:total], want_cos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin[:total], want_sin, rtol=0, atol=1e-6)


def test_vision_cos_sin_casts_last(ck):
    vis = ck.dims.vision
    grids = GRIDS["images_and_videos"]
    cos32, sin32 = vision_cos_sin(grids, vis.head_dim, vis.merge_size, 64)
    cos16, sin16 = vision_cos_sin(grids, vis.head_dim, vis.merge_size, 64, dtype=np.float16)
    assert cos16.dtype == sin16.dtype == np.float16
    np.testing.assert_array_equal(cos16, cos32.astype(np.float16))
    np.testing.assert_array_equal(sin16, sin32.astype(np.float16))


def test_grid_not_divisible_by_merge_size(ck):
    with pytest.raises(QvlcError, match="multiples of merge_size"):
        vision_cos_sin([[1, 4, 5]], ck.dims.vision.head_dim, 2, 32)


# ---- attention mask ---------------------------------------------------------------------------------------------

def block_diagonal_from_cu_seqlens(cu_seqlens: np.ndarray) -> np.ndarray:
    total = int(cu_seqlens[-1])
    mask = np.zeros((total, total), dtype=bool)
    for start, stop in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        mask[start:stop, start:stop] = True
    return mask


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_mask_matches_cu_seqlens(ck, case):
    grids = GRIDS[case]
    n = padded_n(grids)
    cu_seqlens = run_visual(ck, grids)["cu_seqlens"].numpy()
    total = int(cu_seqlens[-1])

    mask = vision_attention_mask(grids, n)
    assert mask.shape == (1, n, n) and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask[0, :total, :total], block_diagonal_from_cu_seqlens(cu_seqlens))
    assert not mask[0, :total, total:].any() and not mask[0, total:, :total].any()
    np.testing.assert_array_equal(mask[0, total:, total:], np.eye(n - total, dtype=bool))


def test_video_frames_are_separate_segments():
    """A t=2 grid is two segments: the frames do not attend to each other (cu_seqlens repeats h*w per t)."""
    mask = vision_attention_mask([[2, 2, 4]], 16)[0]
    assert mask[:8, :8].all() and mask[8:, 8:].all()
    assert not mask[:8, 8:].any() and not mask[8:, :8].any()


def test_exact_fit_has_no_padding():
    mask = vision_attention_mask([[1, 4, 4]], 16)
    assert mask.all()


# ---- patch budget -----------------------------------------------------------------------------------------------

def test_fit_grids_accepts_up_to_n():
    out = fit_grids([[1, 4, 4], [2, 2, 4]], 32)
    assert out.dtype == np.int64 and out.tolist() == [[1, 4, 4], [2, 2, 4]]


@pytest.mark.parametrize("call", [
    lambda g, n: fit_grids(g, n),
    lambda g, n: vision_cos_sin(g, 16, 2, n),
    lambda g, n: vision_attention_mask(g, n),
])
def test_too_many_patches_is_a_clear_error(call):
    with pytest.raises(QvlcError) as info:
        call([[1, 4, 4], [2, 2, 6]], 32)  # 16 + 24 = 40 > 32
    err = info.value
    assert err.key == "export.max_patches"
    assert "40 patches" in err.problem and "32" in err.problem
    assert "max_patches >= 48" in err.fix


def test_malformed_grids_are_rejected():
    with pytest.raises(QvlcError, match="shape"):
        fit_grids([[1, 4]], 32)
    with pytest.raises(QvlcError, match="positive"):
        fit_grids([[0, 4, 4]], 32)
