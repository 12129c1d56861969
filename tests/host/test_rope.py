"""qvlc.host.rope against transformers 4.57.6: get_rope_index, M-RoPE cos/sin, decode positions."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLRotaryEmbedding,
    apply_multimodal_rotary_pos_emb,
)

from qvlc.artifact.spec import TokenIds
from qvlc.checkpoint.tiny import shipped_config
from qvlc.errors import QvlcError
from qvlc.host.rope import (
    decode_cos_sin,
    decode_position,
    get_rope_index,
    mrope_cos_sin,
    mrope_inv_freq,
)
from qvlc.models.common.dims import ModelDims
from qvlc.models.qwen2_vl import FAMILY as QWEN2_VL

PAD_ID = 0
PATCH_DIM = 1176


# ---- prompt building --------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    ids: list[int]
    images: list[list[int]]
    videos: list[list[int]]
    left_pad: int = 0
    right_pad: int = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        ids = np.array([PAD_ID] * self.left_pad + self.ids + [PAD_ID] * self.right_pad, dtype=np.int64)
        mask = None
        if self.left_pad or self.right_pad:
            mask = np.array([0] * self.left_pad + [1] * len(self.ids) + [0] * self.right_pad, dtype=np.int64)
        images = np.array(self.images, dtype=np.int64) if self.images else None
        videos = np.array(self.videos, dtype=np.int64) if self.videos else None
        return ids, images, videos, mask


class Builder:
    """Builds prompts ``[text..., vision_start, pad x t*h*w/merge^2, vision_end, text...]``."""

    def __init__(self, tokens: TokenIds, merge: int, seed: int = 0) -> None:
        self.tokens, self.merge = tokens, merge
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.images: list[list[int]] = []
        self.videos: list[list[int]] = []

    def text(self, n: int) -> "Builder":
        self.ids += [int(x) for x in self.rng.integers(1, 1000, n)]  # below every special id of the tiny vocab
        return self

    def _vision(self, pad: int, grid: list[int]) -> None:
        t, h, w = grid
        self.ids += [self.tokens.vision_start] + [pad] * (t * h * w // self.merge**2) + [self.tokens.vision_end]

    def image(self, t: int, h: int, w: int) -> "Builder":
        self._vision(self.tokens.image, [t, h, w])
        self.images.append([t, h, w])
        return self

    def video(self, t: int, h: int, w: int) -> "Builder":
        self._vision(self.tokens.video, [t, h, w])
        self.videos.append([t, h, w])
        return self

    def build(self, left_pad: int = 0, right_pad: int = 0) -> Prompt:
        return Prompt(list(self.ids), list(self.images), list(self.videos), left_pad, right_pad)


CASES = {
    "text": lambda b: b.text(7).build(),
    "text_left_pad": lambda b: b.text(7).build(left_pad=3),
    "text_left_pad_one_token": lambda b: b.text(1).build(left_pad=4),
    "one_image": lambda b: b.text(3).image(1, 4, 6).text(5).build(),
    "images_different_grids": lambda b: (
        b.image(1, 2, 2).text(2).image(1, 4, 6).image(1, 6, 4).text(3).image(1, 8, 2).text(1).build()
    ),
    "video_t3": lambda b: b.text(2).video(3, 4, 6).text(4).build(),
    "video_t4_1x1": lambda b: b.text(1).video(4, 2, 2).text(1).build(),
    "images_and_video": lambda b: (
        b.text(2).image(1, 4, 4).text(1).video(3, 2, 4).text(2).image(1, 2, 6).video(2, 4, 2).text(3).build()
    ),
    "left_pad_images": lambda b: b.text(2).image(1, 4, 6).text(3).image(1, 2, 2).text(2).build(left_pad=5),
    "right_pad_video": lambda b: b.text(2).video(2, 2, 4).text(2).build(right_pad=4),
    "image_last": lambda b: b.text(4).image(1, 2, 4).build(),
}


def oracle_rope_index(ck, ids, images, videos, mask) -> tuple[np.ndarray, int]:
    pos, delta = ck.model.model.get_rope_index(
        torch.from_numpy(ids)[None],
        image_grid_thw=None if images is None else torch.from_numpy(images),
        video_grid_thw=None if videos is None else torch.from_numpy(videos),
        attention_mask=None if mask is None else torch.from_numpy(mask)[None],
    )
    assert pos.shape == (3, 1, len(ids))
    return pos[:, 0].numpy(), int(delta.reshape(-1)[0])


# ---- get_rope_index ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_get_rope_index_matches_transformers(ck, case):
    prompt = CASES[case](Builder(ck.dims.tokens, ck.dims.vision.merge_size))
    ids, images, videos, mask = prompt.arrays()
    want_pos, want_delta = oracle_rope_index(ck, ids, images, videos, mask)
    pos, delta = get_rope_index(ids, ck.dims.tokens, ck.dims.vision.merge_size, images, videos, mask)
    assert pos.dtype == np.int64 and pos.shape == (3, len(ids))
    np.testing.assert_array_equal(pos, want_pos)
    assert isinstance(delta, int) and delta == want_delta


def test_text_branch_mask_of_ones_equals_no_mask(ck):
    ids, _, _, _ = Builder(ck.dims.tokens, 2).text(6).build().arrays()
    want_pos, want_delta = oracle_rope_index(ck, ids, None, None, np.ones_like(ids))
    pos, delta = get_rope_index(ids, ck.dims.tokens, 2, attention_mask=np.ones_like(ids))
    np.testing.assert_array_equal(pos, want_pos)
    assert delta == want_delta == 0


def test_grids_given_but_prompt_is_text_only(ck):
    """Grids switch transformers to its multimodal branch even when the prompt holds no vision token."""
    ids, _, _, mask = Builder(ck.dims.tokens, 2).text(5).build(left_pad=3).arrays()
    grids = np.array([[1, 4, 4]])
    want_pos, want_delta = oracle_rope_index(ck, ids, grids, None, mask)
    pos, delta = get_rope_index(ids, ck.dims.tokens, 2, image_grid_thw=grids, attention_mask=mask)
    np.testing.assert_array_equal(pos, want_pos)
    assert delta == want_delta


def test_video_positions_follow_4_57(ck):
    """Pinned: after a t=4 video on a 1x1 merged grid, text resumes at (largest vision position + 1).

    Video frames advance the temporal axis by one per temporal patch (4.57); 5.x differs here.
    """
    prompt = Builder(ck.dims.tokens, 2).text(1).video(4, 2, 2).text(1).build()
    ids, _, videos, _ = prompt.arrays()
    pos, delta = get_rope_index(ids, ck.dims.tokens, 2, video_grid_thw=videos)
    # [T, vs, v, v, v, v, ve, T]: vision at 2 + (t, 0, 0); vision_end at 6, last text at 7.
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 2, 2, 2, 6, 7])
    np.testing.assert_array_equal(pos[2], pos[1])
    assert delta == 0


@pytest.mark.parametrize("n_pads", [5, 7])
def test_pad_count_mismatch_is_an_error(ck, n_pads):
    """transformers silently mis-positions these prompts (the counts still add up); the host refuses them."""
    tokens = ck.dims.tokens
    ids = np.array([5, tokens.vision_start] + [tokens.image] * n_pads + [tokens.vision_end, 6])
    with pytest.raises(QvlcError, match="needs 6 pad tokens"):
        get_rope_index(ids, tokens, 2, image_grid_thw=[[1, 4, 6]])


def test_missing_grid_is_an_error(ck):
    prompt = Builder(ck.dims.tokens, 2).text(1).image(1, 2, 2).image(1, 2, 2).build()
    ids, images, _, _ = prompt.arrays()
    with pytest.raises(QvlcError, match="2 image"):
        get_rope_index(ids, ck.dims.tokens, 2, image_grid_thw=images[:1])


# ---- M-RoPE cos/sin ---------------------------------------------------------------------------------------------

def rotary_2b() -> tuple[Qwen2VLRotaryEmbedding, ModelDims]:
    cfg = shipped_config("qwen2_vl_2b")
    return Qwen2VLRotaryEmbedding(Qwen2VLConfig(**cfg).text_config), QWEN2_VL.dims(cfg)


def rotate_half_np(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def merge_like_transformers(table: torch.Tensor, section: list[int]) -> torch.Tensor:
    """[3, 1, S, D] → [1, 1, S, D], the merge written in apply_multimodal_rotary_pos_emb."""
    return torch.cat([m[i % 3] for i, m in enumerate(table.split(section * 2, dim=-1))], dim=-1).unsqueeze(1)


def test_inv_freq_matches_transformers(ck):
    text = ck.dims.text
    np.testing.assert_array_equal(
        mrope_inv_freq(text.head_dim, text.rope_theta), ck.text_model.rotary_emb.inv_freq.numpy()
    )
    rotary, dims = rotary_2b()
    ours = mrope_inv_freq(dims.text.head_dim, dims.text.rope_theta)
    assert ours.dtype == np.float32 and ours.shape == (dims.text.head_dim // 2,)
    # torch's vectorised fp32 pow may be 1 ulp off the correctly rounded value on a few entries.
    np.testing.assert_array_max_ulp(ours, rotary.inv_freq.numpy(), maxulp=1)


def mixed_positions(ck, offset: int) -> np.ndarray:
    prompt = CASES["images_and_video"](Builder(ck.dims.tokens, ck.dims.vision.merge_size))
    ids, images, videos, mask = prompt.arrays()
    pos, _ = get_rope_index(ids, ck.dims.tokens, ck.dims.vision.merge_size, images, videos, mask)
    assert not (pos[0] == pos[1]).all() and not (pos[1] == pos[2]).all()  # the three axes really differ
    return pos + offset


@pytest.mark.parametrize("model", ["tiny", "2b"])
@pytest.mark.parametrize("offset", [0, 3000])
def test_mrope_cos_sin_matches_transformers(ck, model, offset):
    if model == "tiny":
        rotary, text, heads, kv_heads = ck.text_model.rotary_emb, ck.dims.text, ck.dims.text.heads, 2
    else:
        rotary, dims = rotary_2b()
        text, heads, kv_heads = dims.text, dims.text.heads, dims.text.kv_heads
    section = list(text.mrope_section)
    pos = mixed_positions(ck, offset)
    seq, dim = pos.shape[1], text.head_dim

    cos_t, sin_t = rotary(torch.zeros(1), torch.from_numpy(pos)[:, None, :])
    cos, sin = mrope_cos_sin(pos, dim, text.rope_theta, section)
    assert cos.shape == sin.shape == (1, 1, seq, dim) and cos.dtype == sin.dtype == np.float32
    np.testing.assert_allclose(cos, merge_like_transformers(cos_t, section).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, merge_like_transformers(sin_t, section).numpy(), rtol=0, atol=1e-6)

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, heads, seq, dim, generator=gen)
    k = torch.randn(1, kv_heads, seq, dim, generator=gen)
    q_ref, k_ref = apply_multimodal_rotary_pos_emb(q, k, cos_t, sin_t, section)
    q_np, k_np = q.numpy(), k.numpy()
    np.testing.assert_allclose(q_np * cos + rotate_half_np(q_np) * sin, q_ref.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(k_np * cos + rotate_half_np(k_np) * sin, k_ref.numpy(), rtol=0, atol=2e-6)


def test_mrope_cos_sin_casts_last(ck):
    text = ck.dims.text
    pos = mixed_positions(ck, 0)
    cos32, sin32 = mrope_cos_sin(pos, text.head_dim, text.rope_theta, text.mrope_section)
    cos16, sin16 = mrope_cos_sin(pos, text.head_dim, text.rope_theta, text.mrope_section, dtype=np.float16)
    assert cos16.dtype == sin16.dtype == np.float16
    np.testing.assert_array_equal(cos16, cos32.astype(np.float16))
    np.testing.assert_array_equal(sin16, sin32.astype(np.float16))


def test_mrope_section_must_cover_half_head_dim():
    with pytest.raises(QvlcError, match="mrope_section"):
        mrope_cos_sin(np.zeros((3, 4), np.int64), 16, 1e6, (2, 3, 2))


# ---- prefill rope_delta and decode positions --------------------------------------------------------------------

def model_inputs(prompt: Prompt) -> dict[str, torch.Tensor]:
    ids, images, videos, mask = prompt.arrays()
    gen = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.from_numpy(ids)[None]}
    inputs["attention_mask"] = torch.from_numpy(mask if mask is not None else np.ones_like(ids))[None]
    if images is not None:
        inputs["image_grid_thw"] = torch.from_numpy(images)
        inputs["pixel_values"] = torch.randn(int(images.prod(1).sum()), PATCH_DIM, generator=gen)
    if videos is not None:
        inputs["video_grid_thw"] = torch.from_numpy(videos)
        inputs["pixel_values_videos"] = torch.randn(int(videos.prod(1).sum()), PATCH_DIM, generator=gen)
    return inputs


@pytest.mark.parametrize("case", ["one_image", "video_t3", "images_and_video", "left_pad_images", "text_left_pad"])
def test_rope_delta_matches_model_after_prefill(ck, case):
    prompt = CASES[case](Builder(ck.dims.tokens, ck.dims.vision.merge_size))
    ids, images, videos, mask = prompt.arrays()
    _, delta = get_rope_index(ids, ck.dims.tokens, ck.dims.vision.merge_size, images, videos, mask)
    ck.model.model.rope_deltas = None
    with torch.no_grad():
        ck.model(**model_inputs(prompt), use_cache=False)
    assert int(ck.model.model.rope_deltas.reshape(-1)[0]) == delta
    if case != "text_left_pad":
        assert delta != 0  # the vision grids really shift the decode positions


@pytest.mark.parametrize("case", ["left_pad_images", "images_and_video"])
def test_decode_positions_and_cos_sin_match_generate(ck, case):
    """Greedy generate: capture the positions and the rotary tables transformers uses at every step."""
    prompt = CASES[case](Builder(ck.dims.tokens, ck.dims.vision.merge_size))
    ids, images, videos, mask = prompt.arrays()
    text = ck.dims.text
    pos, delta = get_rope_index(ids, ck.dims.tokens, ck.dims.vision.merge_size, images, videos, mask)

    seen_pos: list[torch.Tensor] = []
    seen_tables: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        ck.text_model.register_forward_pre_hook(
            lambda _m, _a, kw: seen_pos.append(kw["position_ids"][-3:, 0].clone()), with_kwargs=True
        ),
        ck.text_model.rotary_emb.register_forward_hook(lambda _m, _a, out: seen_tables.append(out)),
    ]
    steps = 4
    try:
        ck.model.model.rope_deltas = None
        with torch.no_grad():
            ck.model.generate(
                **model_inputs(prompt), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                pad_token_id=PAD_ID,
            )
    finally:
        for hook in hooks:
            hook.remove()

    assert len(seen_pos) == steps  # prefill + (steps - 1) decode calls
    np.testing.assert_array_equal(seen_pos[0].numpy(), pos)
    seq = len(ids)
    for step in range(steps - 1):
        position = decode_position(seq, step, delta)
        np.testing.assert_array_equal(seen_pos[step + 1].numpy(), np.full((3, 1), position))
        cos, sin = decode_cos_sin(position, text.head_dim, text.rope_theta, text.mrope_section)
        assert cos.shape == sin.shape == (1, 1, 1, text.head_dim)
        cos_t, sin_t = seen_tables[step + 1]
        section = list(text.mrope_section)
        np.testing.assert_allclose(cos, merge_like_transformers(cos_t, section).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(sin, merge_like_transformers(sin_t, section).numpy(), rtol=0, atol=1e-6)


def test_decode_position_rule():
    assert decode_position(prefill_len=10, step=0, rope_delta=-4) == 6
    assert decode_position(prefill_len=10, step=3, rope_delta=-4) == 9
    assert decode_position(prefill_len=8, step=0, rope_delta=0) == 8


def test_host_modules_do_not_import_torch():
    code = "import sys, qvlc.host.rope, qvlc.host.vision; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
