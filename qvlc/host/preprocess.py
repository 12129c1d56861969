"""Host image/video preprocessing for Qwen2-VL in NumPy (PIL only for the bicubic resize), no torch.

Reproduces transformers 4.57.6's slow ``Qwen2VLImageProcessor`` bit for bit: smart_resize, PIL bicubic resize,
rescale (float64 then float32), normalize (float32), then the tile → reshape → transpose → reshape into
flattened patches of ``in_chans * temporal_patch_size * patch_size**2`` (1176) values each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

import numpy as np
from PIL import Image

from qvlc.errors import QvlcError

ImageLike = Union[Image.Image, np.ndarray]

MAX_ASPECT_RATIO = 200
# resized images hold at most this many pixels, whatever a config says (Qwen-VL's largest max_pixels: 16384 x 28 x 28)
MAX_PIXELS_BOUND = 1 << 26


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to: both multiples of ``factor``, pixel count within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible (transformers' rules, exactly).

    Raises QvlcError, as the original Qwen2-VL rules do, for a side shorter than ``factor`` (transformers 4.57
    dropped that check and scales such slivers up instead) and for an aspect ratio over 200; also for bounds
    that leave no valid size.
    """
    if height < factor or width < factor:
        raise QvlcError(
            f"image size {height}x{width} (height x width) has a side shorter than {factor} pixels, one patch "
            f"after merging",
            fix=f"pad or resize the image so both sides are at least {factor} pixels", key="image")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise QvlcError(
            f"image size {height}x{width} (height x width) has aspect ratio {ratio:.1f}; Qwen2-VL accepts at most "
            f"{MAX_ASPECT_RATIO}",
            fix=f"crop or pad the image so that its longer side is at most {MAX_ASPECT_RATIO} times its shorter side",
            key="image",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise QvlcError(
            f"image size {height}x{width} resizes to {h_bar}x{w_bar} with min_pixels={min_pixels}, "
            f"max_pixels={max_pixels}, factor={factor}",
            fix=f"set min_pixels to at least {factor * factor} (one merged patch)",
            key="min_pixels",
        )
    return h_bar, w_bar


@dataclass(frozen=True)
class PreprocessConfig:
    """What the host needs to turn images into ``pixel_values``; written as ``preprocess.json``.

    Defaults are Qwen2-VL-2B/7B-Instruct's preprocessor_config.json.
    """

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    video_min_pixels: int = 128 * 28 * 28  # per frame (transformers' Qwen2VLVideoProcessor defaults)
    video_max_pixels: int = 768 * 28 * 28
    # the video processor's rules (set by Family.video_rules): frames sampled as a ramp from frame 0 to a multiple
    # of temporal_patch_size, or by linspace first to last; the video pixel bounds per frame, or over t x h x w
    video_sampling: str = "ramp"
    video_budget: str = "frame"

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), {"int": int, "float": float, "str": str}.get(f.type)
            if kind is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                                                 else kind)):
                raise QvlcError(f"{f.name} is {value!r:.60}, not a {f.type}", fix=f"give {f.name} as a {f.type}",
                                key=f.name)
            if kind is float and not math.isfinite(value):
                raise QvlcError(f"{f.name} is {value}", fix=f"give {f.name} as a finite number", key=f.name)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
                raise QvlcError(f"{name} is {value!r:.60}", fix=f"give {name} as a list of numbers, one per channel",
                                key=name)
            object.__setattr__(self, name, tuple(float(x) for x in value))
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if not 0 < getattr(self, name) <= 64:
                raise QvlcError(f"{name} is {getattr(self, name)}", fix=f"{name} must be an integer from 1 to 64",
                                key=name)
        for lo, hi in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if not 0 < getattr(self, lo) <= getattr(self, hi) <= MAX_PIXELS_BOUND:
                raise QvlcError(f"{lo}={getattr(self, lo)}, {hi}={getattr(self, hi)}",
                                fix=f"use 0 < {lo} <= {hi} <= {MAX_PIXELS_BOUND}", key=lo)
        if len(self.image_mean) != len(self.image_std):
            raise QvlcError(f"image_mean has {len(self.image_mean)} values, image_std {len(self.image_std)}",
                            fix="give one mean and one std per channel", key="image_mean")
        for key, allowed in (("video_sampling", VIDEO_SAMPLING), ("video_budget", VIDEO_BUDGET)):
            if getattr(self, key) not in allowed:
                raise QvlcError(f"{key} {getattr(self, key)!r}", fix=f"use one of {', '.join(allowed)}", key=key)
        if any(s == 0 for s in self.image_std):
            raise QvlcError("image_std contains 0", fix="use the checkpoint's image_std", key="image_std")

    @property
    def factor(self) -> int:
        """Resize granularity in pixels: patch_size * merge_size (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def in_chans(self) -> int:
        return len(self.image_mean)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: in_chans * temporal_patch_size * patch_size**2 (1176 for Qwen2-VL)."""
        return self.in_chans * self.temporal_patch_size * self.patch_size**2

    def resized_size(self, height: int, width: int, video: bool = False, frames: int = 1) -> tuple[int, int]:
        """smart_resize with this config's factor and pixel bounds (the video ones for the ``frames`` frames of a
        video: per frame, or over the whole clip)."""
        if video and self.video_budget == "clip":
            return smart_resize_clip(frames, height, width, self.temporal_patch_size, self.factor,
                                     self.video_min_pixels, self.video_max_pixels)
        if video:
            return smart_resize(height, width, self.factor, self.video_min_pixels, self.video_max_pixels)
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, trailing newline): the content of ``preprocess.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QvlcError(f"unknown preprocess keys {unknown}", fix=f"use only {sorted(known)}", key=unknown[0])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessConfig":
        return cls.from_dict(json.loads(text))


VIDEO_SAMPLING, VIDEO_BUDGET = ("ramp", "linspace"), ("frame", "clip")


def smart_resize_clip(frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int,
                      max_pixels: int) -> tuple[int, int]:
    """transformers 4.57.6 Qwen3-VL video ``smart_resize``: the pixel bounds hold for the whole clip (frames
    rounded to the temporal factor x height x width), so a longer clip gets smaller frames."""
    if frames < temporal_factor:
        raise QvlcError(f"the video has {frames} sampled frame(s); the processor needs at least {temporal_factor}",
                        fix="pass a longer video, or sample more frames (a higher --fps)", key="video")
    if height < factor or width < factor or max(height, width) / min(height, width) > 200:
        raise QvlcError(f"video frames of {height}x{width} cannot be resized for the vision tower", key="video",
                        fix=f"use frames of at least {factor}x{factor} with an aspect ratio below 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image as a uint8 [H, W, 3] array (PIL images of any mode are converted to RGB, alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise QvlcError(f"image array has dtype {image.dtype}", fix="pass uint8 pixels in 0..255 (H, W, 3)",
                            key="image")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4)):
            return np.asarray(Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1
                                              else image).convert("RGB"))
        if image.ndim == 3 and image.shape[2] == 3:
            return image
        raise QvlcError(f"image array has shape {image.shape}", fix="pass channels-last arrays (H, W, 3)", key="image")
    raise QvlcError(f"unsupported image type {type(image).__name__}", fix="pass a PIL image or a uint8 numpy array",
                    key="image")


def _normalized_frame(rgb: np.ndarray, size: tuple[int, int], cfg: PreprocessConfig) -> np.ndarray:
    """Resize (PIL bicubic), rescale and normalize one frame; returns float32 [C, H, W]."""
    height, width = size
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)


def _patchify(frames: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """[T, C, H, W] float32 → (pixel_values [t*h*w, patch_dim], grid_thw [3]) in Qwen2-VL's 2×2 merge order."""
    tps, ps, ms = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if frames.shape[0] % tps:
        pad = np.repeat(frames[-1:], tps - frames.shape[0] % tps, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    t_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = t_frames // tps, height // ps, width // ps
    patches = frames.reshape(grid_t, tps, channels, grid_h // ms, ms, ps, grid_w // ms, ms, ps)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * tps * ps * ps)
    return np.ascontiguousarray(flat, dtype=np.float32), np.array([grid_t, grid_h, grid_w], dtype=np.int64)


def image_to_patches(image: ImageLike, cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image → (pixel_values float32 [n_patches, patch_dim], grid_thw int64 [3]).

    The image is repeated temporal_patch_size times, so grid_thw[0] is 1.
    """
    cfg = cfg or PreprocessConfig()
    rgb = _to_rgb_array(image)
    size = cfg.resized_size(rgb.shape[0], rgb.shape[1])
    return _patchify(_normalized_frame(rgb, size, cfg)[None], cfg)


def video_to_patches(frames: Sequence[ImageLike] | np.ndarray,
                     cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Video frames (list of images, or uint8 [T, H, W, 3]) → (pixel_values [t*h*w, patch_dim], grid_thw [3]).

    All frames take the first frame's resized size within the video pixel bounds (per frame, or over the clip
    with ``video_budget: clip``); T is padded to a multiple of
    temporal_patch_size by repeating the last frame (as transformers does). Frames are not sampled here
    (``qvlc.runtime.media.load_video`` samples them).
    """
    cfg = cfg or PreprocessConfig()
    frame_list = list(frames)
    if not frame_list:
        raise QvlcError("video has no frames", fix="pass at least one frame", key="video")
    rgbs = [_to_rgb_array(f) for f in frame_list]
    shapes = {r.shape for r in rgbs}
    if len(shapes) != 1:
        raise QvlcError(f"video frames have different sizes {sorted(shapes)}",
                        fix="resize or crop all frames of a video to one size", key="video")
    size = cfg.resized_size(rgbs[0].shape[0], rgbs[0].shape[1], video=True, frames=len(rgbs))
    return _patchify(np.stack([_normalized_frame(r, size, cfg) for r in rgbs]), cfg)


def images_to_patches(images: Sequence[ImageLike],
                      cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Several images → (pixel_values concatenated [sum n_patches, patch_dim], grid_thw int64 [k, 3])."""
    cfg = cfg or PreprocessConfig()
    if not images:
        return np.zeros((0, cfg.patch_dim), dtype=np.float32), np.zeros((0, 3), dtype=np.int64)
    parts = [image_to_patches(im, cfg) for im in images]
    return np.concatenate([p for p, _ in parts]), np.stack([g for _, g in parts])
