"""qvlc.host.preprocess against transformers 4.57.6's slow Qwen2VLImageProcessor (and its video path)."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from qvlc.checkpoint.processor import read_preprocess_config
from qvlc.checkpoint.tokenizer import tiny_tokenizer_files
from qvlc.errors import QvlcError
from qvlc.host.preprocess import (
    PreprocessConfig,
    image_to_patches,
    images_to_patches,
    smart_resize,
    video_to_patches,
)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def hf_processor(cfg: PreprocessConfig) -> Qwen2VLImageProcessor:
    """The slow transformers image processor with the same settings as ``cfg``."""
    return Qwen2VLImageProcessor(
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), rescale_factor=cfg.rescale_factor,
    )


def random_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def smooth_frames(t: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([
        np.stack([127 + 120 * np.sin(xx / 7 + c + k) * np.cos(yy / 11) for c in range(3)], -1) for k in range(t)
    ]).astype(np.uint8)


# --- smart_resize ---------------------------------------------------------------------------------------------

SIDES = [1, 2, 13, 14, 27, 28, 29, 41, 42, 43, 55, 56, 57, 70, 84, 97, 100, 224, 333, 480, 1000, 1080, 1920, 4000]
BOUNDS = [(56 * 56, 14 * 14 * 4 * 1280), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 16), (100 * 28 * 28, 200 * 28 * 28)]


@pytest.mark.parametrize("min_pixels,max_pixels", BOUNDS)
@pytest.mark.parametrize("factor", [28, 32])
def test_smart_resize_matches_transformers(factor: int, min_pixels: int, max_pixels: int) -> None:
    rng = np.random.default_rng(factor + min_pixels)
    sizes = list(itertools.product(SIDES, SIDES)) + [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200 or min(h, w) < factor:  # both refused (see the tests below)
            continue
        expected = hf_smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        assert smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w)
        checked += 1
    assert checked > 500


def test_smart_resize_half_rounding_and_max_branch() -> None:
    # round() is half-to-even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4, 126/28 = 4.5 -> 4.
    assert smart_resize(42, 70) == hf_smart_resize(42, 70) == (56, 56)
    assert smart_resize(98, 126) == hf_smart_resize(98, 126) == (112, 112)
    # 1008 x 1008 would exceed the default 1003520 pixels: scaled down with floor.
    assert smart_resize(1000, 1000) == hf_smart_resize(1000, 1000) == (980, 980)


def test_smart_resize_refuses_a_side_below_the_factor() -> None:
    # The original Qwen2-VL rule; transformers 4.57 dropped it and scales such slivers up to min_pixels.
    for h, w in [(1, 150), (10, 100), (27, 27), (5, 900), (28, 27)]:
        with pytest.raises(QvlcError, match="shorter than 28") as err:
            smart_resize(h, w)
        assert "at least 28 pixels" in err.value.fix
    assert smart_resize(28, 28) == hf_smart_resize(28, 28)
    with pytest.raises(QvlcError, match="shorter than 28"):
        image_to_patches(random_image(10, 100, 1), PreprocessConfig())


@pytest.mark.parametrize("h,w", [(28, 5601), (30, 6001), (6000, 29)])
def test_smart_resize_rejects_aspect_ratio_over_200(h: int, w: int) -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(h, w)
    with pytest.raises(QvlcError, match="aspect ratio") as err:
        smart_resize(h, w)
    assert "200" in err.value.fix


def test_smart_resize_aspect_ratio_200_is_allowed() -> None:
    assert smart_resize(30, 6000) == hf_smart_resize(30, 6000)
    assert smart_resize(28, 5600, max_pixels=28 * 5600) == hf_smart_resize(28, 5600, max_pixels=28 * 5600)


@pytest.mark.parametrize("h,w", [(0, 10), (10, 0), (-5, 10)])
def test_smart_resize_rejects_empty_side(h: int, w: int) -> None:
    with pytest.raises(QvlcError, match="shorter than"):
        smart_resize(h, w)


# --- PreprocessConfig -----------------------------------------------------------------------------------------

def test_config_defaults_equal_qwen2_vl_preprocessor_config() -> None:
    shipped = next(p for p in tiny_tokenizer_files() if p.name == "preprocessor_config.json")
    raw = json.loads(shipped.read_text())
    cfg = PreprocessConfig()
    assert cfg.min_pixels == raw["min_pixels"] == 3136
    assert cfg.max_pixels == raw["max_pixels"] == 12845056
    assert list(cfg.image_mean) == raw["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert list(cfg.image_std) == raw["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (14, 2, 2)
    assert cfg.patch_dim == 1176 and cfg.factor == 28
    hf = Qwen2VLImageProcessor.from_pretrained(shipped.parent)
    assert (hf.min_pixels, hf.max_pixels, hf.rescale_factor) == (cfg.min_pixels, cfg.max_pixels, cfg.rescale_factor)


def test_config_json_round_trip_and_determinism() -> None:
    cfg = PreprocessConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    text = cfg.to_json()
    assert PreprocessConfig.from_json(text) == cfg
    assert text == PreprocessConfig.from_json(text).to_json()
    assert json.loads(text)["max_pixels"] == 28 * 28 * 64
    with pytest.raises(QvlcError, match="unknown preprocess keys"):
        PreprocessConfig.from_json(json.dumps({**cfg.to_dict(), "max_pixel": 5}))
    with pytest.raises(QvlcError):
        PreprocessConfig(min_pixels=10, max_pixels=5)


def test_config_from_checkpoint(tmp_path) -> None:
    assert read_preprocess_config(tmp_path) == PreprocessConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 1000, "longest_edge": 50000}, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "patch_size": 14, "image_processor_type": "Qwen2VLImageProcessor",
    }))
    cfg = read_preprocess_config(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean, cfg.image_std) == (1000, 50000, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 2000, "max_pixels": 80000}))
    assert read_preprocess_config(tmp_path) == PreprocessConfig(min_pixels=2000, max_pixels=80000)


# --- images ---------------------------------------------------------------------------------------------------

SMALL_MAX = PreprocessConfig(max_pixels=28 * 28 * 64)
IMAGE_CASES = {
    "small_upscaled": (random_image(28, 40, 1), PreprocessConfig()),
    "tiny_square": (random_image(30, 30, 2), PreprocessConfig()),
    "non_multiple": (random_image(57, 85, 3), PreprocessConfig()),
    "exact_multiple": (random_image(112, 168, 4), PreprocessConfig()),
    "extreme_aspect_30x1500": (random_image(30, 1500, 5), PreprocessConfig()),
    "tall_1500x30": (random_image(1500, 30, 6), PreprocessConfig()),
    "above_max_pixels": (random_image(1300, 1000, 7), PreprocessConfig(max_pixels=14 * 14 * 4 * 1280)),
    "above_small_max": (random_image(400, 333, 8), SMALL_MAX),
    "rgba": (random_image(90, 60, 9, mode="RGBA"), PreprocessConfig()),
    "grayscale": (random_image(70, 110, 10, mode="L"), PreprocessConfig()),
    "palette": (random_image(64, 64, 11, mode="P"), PreprocessConfig()),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_to_patches_matches_transformers(case: str) -> None:
    image, cfg = IMAGE_CASES[case]
    expected = hf_processor(cfg)(images=[image], return_tensors="np")
    pixel_values, grid = image_to_patches(image, cfg)
    assert grid.dtype == np.int64 and grid.shape == (3,)
    np.testing.assert_array_equal(grid, expected["image_grid_thw"][0])
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == (int(np.prod(grid)), cfg.patch_dim) == expected["pixel_values"].shape
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


def test_image_from_numpy_equals_pil() -> None:
    image = random_image(77, 130, 12)
    a = image_to_patches(image)
    b = image_to_patches(np.asarray(image))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_patch_layout_independent_reference() -> None:
    """A 56x84 image needs no resize, so each row can be rebuilt from the normalized pixels by hand."""
    cfg = PreprocessConfig()
    rgb = np.asarray(random_image(56, 84, 13))
    pixel_values, grid = image_to_patches(rgb, cfg)
    assert grid.tolist() == [1, 4, 6]
    norm = ((rgb.astype(np.float64) / 255 - np.array(cfg.image_mean)) / np.array(cfg.image_std)).astype(np.float32)
    # rows follow 2x2 merge blocks: block (bi, bj) row-major, then (i, j) inside the block
    order = [(2 * bi + i, 2 * bj + j) for bi in range(2) for bj in range(3) for i in range(2) for j in range(2)]
    for row, (r, c) in enumerate(order):
        patch = norm[14 * r:14 * r + 14, 14 * c:14 * c + 14].transpose(2, 0, 1)  # [C, 14, 14]
        expected = np.stack([patch, patch], axis=1).reshape(-1)  # [C, T, 14, 14] with the frame repeated
        np.testing.assert_allclose(pixel_values[row], expected, atol=1e-5)


def test_images_to_patches_concatenates_like_transformers() -> None:
    images = [random_image(57, 85, 14), random_image(120, 40, 15), random_image(28, 28, 16)]
    expected = hf_processor(PreprocessConfig())(images=images, return_tensors="np")
    pixel_values, grids = images_to_patches(images)
    np.testing.assert_array_equal(grids, expected["image_grid_thw"])
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)
    empty_values, empty_grids = images_to_patches([])
    assert empty_values.shape == (0, 1176) and empty_grids.shape == (0, 3)


def test_bad_images_raise() -> None:
    with pytest.raises(QvlcError, match="dtype"):
        image_to_patches(np.zeros((28, 28, 3), dtype=np.float32))
    with pytest.raises(QvlcError, match="shape"):
        image_to_patches(np.zeros((3, 28, 28, 2), dtype=np.uint8))
    with pytest.raises(QvlcError, match="aspect ratio"):
        image_to_patches(random_image(28, 5700))


# --- videos ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 3, 4])
def test_video_matches_transformers_pil_video_path(frames: int) -> None:
    """The slow image processor's video path (PIL bicubic) is reproduced exactly, incl. padding odd T (with the
    image pixel bounds, which that path applies; qvlc's video frames take the video processor's bounds)."""
    rng = np.random.default_rng(frames)
    video = rng.integers(0, 256, (frames, 45, 70, 3), dtype=np.uint8)
    base = PreprocessConfig()
    cfg = PreprocessConfig(video_min_pixels=base.min_pixels, video_max_pixels=base.max_pixels)
    expected = hf_processor(cfg)(images=None, videos=[video], return_tensors="np")
    pixel_values, grid = video_to_patches(video, cfg)
    np.testing.assert_array_equal(grid, expected["video_grid_thw"][0])
    assert grid[0] == -(-frames // 2)
    np.testing.assert_allclose(pixel_values, expected["pixel_values_videos"], rtol=0, atol=1e-6)
    listed, _ = video_to_patches([Image.fromarray(f) for f in video], cfg)
    np.testing.assert_array_equal(listed, pixel_values)


def test_video_last_frame_is_repeated() -> None:
    video = smooth_frames(3, 56, 56)
    padded, grid_padded = video_to_patches(np.concatenate([video, video[-1:]]))
    unpadded, grid = video_to_patches(video)
    np.testing.assert_array_equal(grid, grid_padded)
    np.testing.assert_array_equal(unpadded, padded)


def test_video_frames_of_different_sizes_raise() -> None:
    with pytest.raises(QvlcError, match="different sizes"):
        video_to_patches([random_image(56, 56), random_image(56, 84)])
    with pytest.raises(QvlcError, match="no frames"):
        video_to_patches([])


@pytest.mark.skipif(not HAS_TORCHVISION, reason="Qwen2VLVideoProcessor needs torchvision")
def test_video_close_to_transformers_video_processor() -> None:
    """Qwen2VLVideoProcessor resizes with torchvision (float bicubic, antialias) instead of PIL: same grid,
    values within ~2 uint8 levels on a smooth video (measured 0.030 after normalization)."""
    import torch
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    video = smooth_frames(3, 90, 130)
    cfg = PreprocessConfig()
    proc = Qwen2VLVideoProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    out = proc(videos=[torch.from_numpy(video).permute(0, 3, 1, 2)], return_tensors="pt")
    pixel_values, grid = video_to_patches(video, cfg)
    np.testing.assert_array_equal(grid, out["video_grid_thw"][0].numpy())
    assert np.abs(pixel_values - out["pixel_values_videos"].numpy()).max() < 0.05
