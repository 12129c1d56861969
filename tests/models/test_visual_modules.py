"""Each family's VisualGraph (eager), fed by the family's host inputs, against transformers' vision tower on the
family's tiny random checkpoint."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qvlc.checkpoint.hf_model import LoadedCheckpoint, load_checkpoint
from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.host.vision import vision_attention_mask, vision_cos_sin
from qvlc.models import FAMILIES
from qvlc.models import family as family_of
from qvlc.models.common.family import chunk_widths
from qvlc.models.common.text import example_inputs
from qvlc.models.qwen2_vl.visual import VisualGraph
from qvlc.precision import Precision
from qvlc.validate.metrics import compare, passes

GRIDS = {
    "one_image": [[1, 4, 6]],
    "two_images": [[1, 2, 4], [1, 6, 2]],
    "video_t2": [[2, 4, 4]],
    "image_and_video": [[1, 4, 2], [2, 2, 6]],
}


# grids whose merged rows/columns are not multiples of Qwen2.5-VL's tiny window (2 merged tokens): partial windows
ODD_GRIDS = {"odd_image": [[1, 6, 10]], "odd_video_and_image": [[2, 6, 2], [1, 10, 6]], "wide": [[1, 2, 30]]}


@pytest.fixture(scope="module")
def ck() -> LoadedCheckpoint:
    return load_checkpoint(tiny_checkpoint())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_ck(request):
    fam = family_of(request.param)
    return fam, load_checkpoint(tiny_checkpoint(family=fam))


@torch.no_grad()
def run_family(fam, ck, pixels: torch.Tensor, grids, n: int, dtype=torch.float32, chunk=24,
               attention_block=0) -> torch.Tensor:
    """The family's host inputs → its deployment module → real rows in prompt order, fp32."""
    spec = fam.visual_spec(ck.dims, n, chunk, Precision.FP32 if dtype == torch.float32 else Precision.FP16)
    module = fam.visual_graph(ck.visual, ck.dims, chunk, dtype, attention_block)
    vf = fam.vision_feeds(spec, pixels.numpy(), np.array(grids))
    sig = fam.visual_signature(spec)
    outs = module(*(torch.from_numpy(vf.feeds[name]) for name in sig.input_names))
    got = torch.cat(outs, dim=-1).float()[: vf.tokens]
    return got[torch.from_numpy(vf.order)] if vf.order is not None else got


@pytest.mark.parametrize("case", sorted(GRIDS) + sorted(ODD_GRIDS))
def test_family_matches_transformers_fp32(family_ck, case):
    fam, ck = family_ck
    grids = {**GRIDS, **ODD_GRIDS}[case]
    pixels = patches(grids, ck.dims.vision.patch_dim)
    ref = reference(ck, pixels, grids)
    out = run_family(fam, ck, pixels, grids, n=128)
    assert ref.abs().max() > 0.1  # random biases/norms: a wiring bug would move these numbers
    scale = max(1.0, float(ref.abs().max()))  # Qwen3-VL's rows (and its DeepStack rows) run larger
    torch.testing.assert_close(out, ref, atol=1e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("block", [16, 48])
def test_attention_in_blocks_of_query_rows_is_the_same_attention(family_ck, block):
    """export.attention_block: 128 patches attended 16 or 48 query rows at a time (the last block shorter, blocks
    cutting through images and windows) give what one block gives, and transformers' rows."""
    fam, ck = family_ck
    grids = {**GRIDS, **ODD_GRIDS}["odd_video_and_image"]
    pixels = patches(grids, ck.dims.vision.patch_dim)
    whole = run_family(fam, ck, pixels, grids, n=128)
    blocked = run_family(fam, ck, pixels, grids, n=128, attention_block=block)
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-6)
    ref = reference(ck, pixels, grids)
    torch.testing.assert_close(blocked, ref, atol=1e-6 * max(1.0, float(ref.abs().max())), rtol=1e-5)


def test_family_fp16_close_to_transformers(family_ck):
    fam, ck = family_ck
    grids = ODD_GRIDS["odd_video_and_image"]
    pixels = patches(grids, ck.dims.vision.patch_dim)
    ref = reference(ck, pixels, grids)
    out = run_family(fam, ck, pixels, grids, n=128, dtype=torch.float16, chunk=640)
    assert torch.nn.functional.cosine_similarity(out.ravel(), ref.ravel(), dim=0) > 0.9999
    torch.testing.assert_close(out, ref, atol=3e-3 * max(1.0, float(ref.abs().max())), rtol=1e-2)


@pytest.mark.parametrize("wrong", ["window_as_full", "full_as_window", "no_reorder"])
def test_qwen2_5_vl_windows_matter(wrong):
    """Each half of the window scheme changes the output past the fp32 tolerance: window blocks attending over
    the whole frame, full blocks attending within windows, or output rows left in window order."""
    fam = family_of("qwen2_5_vl")
    ck = load_checkpoint(tiny_checkpoint(family=fam))
    grids = ODD_GRIDS["odd_image"]
    pixels = patches(grids, ck.dims.vision.patch_dim)
    ref = reference(ck, pixels, grids).numpy()
    spec = fam.visual_spec(ck.dims, 64, 640, Precision.FP32)
    module = fam.visual_graph(ck.visual, ck.dims, 640, torch.float32)
    vf = fam.vision_feeds(spec, pixels.numpy(), np.array(grids))
    feeds = dict(vf.feeds)
    if wrong == "window_as_full":
        feeds["window_attention_mask"] = feeds["attention_mask"]
    elif wrong == "full_as_window":
        feeds["attention_mask"] = feeds["window_attention_mask"]
    names = fam.visual_signature(spec).input_names
    with torch.no_grad():
        got = torch.cat(module(*(torch.from_numpy(feeds[n]) for n in names)), -1)[: vf.tokens].numpy()
    if wrong != "no_reorder":
        got = got[vf.order]
    assert not passes(compare(ref, got), Precision.FP32.tolerance)


def patches(grids, dim: int, seed: int = 0) -> torch.Tensor:
    n = int(np.prod(grids, axis=1).sum())
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 1.2


@torch.no_grad()
def run_graph(module: VisualGraph, ck, pixels: torch.Tensor, grids, n: int, mask=None) -> torch.Tensor:
    """Pad to n, host cos/sin and mask, run, concatenate the chunks; all n / merge_unit rows, fp32."""
    v = ck.dims.vision
    dtype = module.patch_embed.weight_t.dtype
    cos, sin = vision_cos_sin(grids, v.head_dim, v.merge_size, n)
    mask = vision_attention_mask(grids, n) if mask is None else mask
    padded = torch.zeros(n, v.patch_dim)
    padded[: len(pixels)] = pixels
    outs = module(padded.to(dtype), torch.from_numpy(mask), torch.from_numpy(cos).to(dtype),
                  torch.from_numpy(sin).to(dtype))
    return torch.cat(outs, dim=-1).float()


@torch.no_grad()
def reference(ck, pixels, grids) -> torch.Tensor:
    """transformers' tower: its embedding, then any DeepStack embeddings (``Family.tower_rows``)."""
    return torch.from_numpy(family_of(ck.dims.family).tower_rows(ck.visual(pixels, grid_thw=torch.tensor(grids))))


def test_chunk_widths():
    assert chunk_widths(1536, 640) == [640, 640, 256]
    assert chunk_widths(3584, 640) == [640] * 5 + [384]
    assert chunk_widths(1280, 640) == [640, 640]
    assert chunk_widths(64, 640) == [64]


def test_padding_does_not_change_real_rows(ck):
    """Same patches in N=32 and N=96, and garbage in the padding rows: the real rows are identical."""
    grids = GRIDS["two_images"]
    pixels = patches(grids, ck.dims.vision.patch_dim)
    module = VisualGraph(ck.visual, ck.dims.vision, 640, torch.float32)
    rows = len(pixels) // ck.dims.vision.merge_unit
    small = run_graph(module, ck, pixels, grids, n=32)
    big = run_graph(module, ck, torch.cat([pixels, 5 * torch.randn(96 - len(pixels), pixels.shape[1])]), grids,
                    n=96)
    torch.testing.assert_close(big[:rows], small[:rows], atol=1e-6, rtol=1e-6)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("wrong", ["one_segment", "identity"])
def test_wrong_mask_fails_fp32_parity(ck, wrong):
    """A mask that joins the two images (one segment) or cuts every patch off (identity) must fail the fp32
    tolerance the validation applies; the right mask passes it."""
    grids = GRIDS["two_images"]
    pixels = patches(grids, ck.dims.vision.patch_dim)
    module = VisualGraph(ck.visual, ck.dims.vision, 640, torch.float32)
    ref = reference(ck, pixels, grids).numpy()
    n = 32
    mask = {"one_segment": vision_attention_mask([[1, 1, len(pixels)]], n),
            "identity": np.eye(n, dtype=bool)[None]}[wrong]
    good = run_graph(module, ck, pixels, grids, n)[: len(ref)].numpy()
    bad = run_graph(module, ck, pixels, grids, n, mask=mask)[: len(ref)].numpy()
    assert passes(compare(ref, good), Precision.FP32.tolerance)
    assert not passes(compare(ref, bad), Precision.FP32.tolerance)


def test_rotary_matters_with_sharp_attention(ck):
    """The tiny tower's attention is nearly uniform (rotary errors move its output by ~2e-5 only), so sharpen it:
    q/k weights x8 in a copy. The module still matches transformers, and dropping the rotary fails fp32 parity."""
    v = ck.dims.vision
    sharp = copy.deepcopy(ck.visual)
    with torch.no_grad():
        for block in sharp.blocks:
            block.attn.qkv.weight[: 2 * v.embed_dim] *= 8
    grids = GRIDS["image_and_video"]
    pixels = patches(grids, v.patch_dim)
    module = VisualGraph(sharp, v, 640, torch.float32)
    ref = reference(SimpleNamespace(visual=sharp, dims=ck.dims), pixels, grids).numpy()
    n = 64
    cos, sin = vision_cos_sin(grids, v.head_dim, v.merge_size, n)
    mask = torch.from_numpy(vision_attention_mask(grids, n))
    padded = torch.zeros(n, v.patch_dim)
    padded[: len(pixels)] = pixels
    with torch.no_grad():
        good = torch.cat(module(padded, mask, torch.from_numpy(cos), torch.from_numpy(sin)), -1)[: len(ref)]
        none = torch.cat(module(padded, mask, torch.ones(n, v.head_dim), torch.zeros(n, v.head_dim)), -1)[: len(ref)]
    assert passes(compare(ref, good.numpy()), Precision.FP32.tolerance)
    assert not passes(compare(ref, none.numpy()), Precision.FP32.tolerance)


def test_parameters_are_views_in_fp32(family_ck):
    """No copy of the Hugging Face weights when the export dtype is the checkpoint's dtype."""
    fam, ck = family_ck
    module = fam.visual_graph(ck.visual, ck.dims, 640, torch.float32)
    hf_ptrs = {p.data_ptr() for p in ck.visual.parameters()}
    assert all(p.data_ptr() in hf_ptrs for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in ck.visual.parameters())


def test_example_inputs_follow_the_signature(family_ck):
    fam, ck = family_ck
    v = ck.dims.vision
    sig = fam.visual_signature(fam.visual_spec(ck.dims, 48, 640, Precision.FP16))
    args = dict(zip(sig.input_names, example_inputs(sig)))
    assert args["pixel_values"].shape == (48, v.patch_dim) and args["pixel_values"].dtype == torch.float16
    assert args["attention_mask"].shape == (1, 48, 48) and args["attention_mask"].dtype == torch.bool
    assert args["cos"].shape == args["sin"].shape == (48, v.head_dim)
    assert ("window_attention_mask" in args) == (fam.model_type == "qwen2_5_vl")
