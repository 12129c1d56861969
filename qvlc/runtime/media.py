"""Images and videos from disk, as `qvlc run` takes them: image files, video files (decoded with PyAV) or folders
of frames, sampled as the Qwen processors sample them (NumPy + PIL; PyAV only for video files)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qvlc.errors import QvlcError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_FPS = 2.0  # frames sampled per second of video (transformers' Qwen2-VL/Qwen2.5-VL processors)
MIN_FRAMES, MAX_FRAMES = 4, 768


def load_image(path: Path | str) -> Image.Image:
    """Open an image file fully as RGB; QvlcError (key ``image``) when it is missing or not a readable image."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QvlcError(f"{str(p)!r} " + ("is a folder, not an image file" if p.is_dir() else "does not exist"),
                        fix="pass the path of an image file (PNG, JPEG, …)", key="image")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise QvlcError(f"{str(p)!r} is not a readable image ({type(exc).__name__}: {exc})",
                        fix="pass a valid image file in a format Pillow reads (PNG, JPEG, WebP, BMP, …)",
                        key="image") from exc


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video and the seconds between consecutive sampled frames."""

    frames: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each
    seconds_per_frame: float  # 1 / the sampling fps

    def second_per_grid(self, temporal_patch_size: int) -> float:
        """Seconds covered by one temporal patch (Qwen2.5-VL's ``second_per_grid_ts``: temporal_patch_size / fps)."""
        return temporal_patch_size * self.seconds_per_frame


def sample_indices(total: int, video_fps: float, temporal_patch_size: int, fps: float = DEFAULT_FPS,
                   min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Frame indices to keep, as transformers 4.57.6 ``Qwen2VLVideoProcessor.sample_frames`` picks them with
    ``fps``: about ``fps`` frames per second, at least ``min_frames``, at most ``max_frames`` and the video's
    frames, rounded down to a multiple of ``temporal_patch_size``, spread evenly from frame 0."""
    if total < temporal_patch_size:
        raise QvlcError(f"the video has {total} frame(s); one temporal patch needs {temporal_patch_size}",
                        fix=f"pass a video with at least {temporal_patch_size} frames", key="video")
    cap = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    n = total / video_fps * fps
    n = min(min(max(n, min_frames), cap), total)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    # torch.arange(0, total, total / n).int(): a float32 ramp, truncated
    return np.arange(0, total, np.float32(total / n), dtype=np.float32).astype(np.int64)[:n]


def load_video(path: Path | str, frames_fps: float = DEFAULT_FPS, temporal_patch_size: int = 2,
               fps: float = DEFAULT_FPS) -> Video:
    """A video file (any format PyAV/FFmpeg decodes) or a folder of frame images (sorted by name, taken as
    ``frames_fps`` frames per second), sampled to ``fps`` frames per second."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise QvlcError(f"the folder {str(p)!r} holds no frame images ({', '.join(IMAGE_SUFFIXES)})",
                            fix="pass a video file, or a folder of frames named in order", key="video")
        frames, rate = [np.asarray(load_image(f)) for f in files], frames_fps
    elif p.is_file():
        frames, rate = _decode(p)
    else:
        raise QvlcError(f"{str(p)!r} does not exist", fix="pass a video file or a folder of frames", key="video")
    keep = sample_indices(len(frames), rate, temporal_patch_size, fps)
    # transformers' processors report temporal_patch_size / fps seconds per temporal patch whatever the sampling
    # achieved (a short video padded up to min_frames included); the M-RoPE time positions follow that.
    return Video(tuple(frames[i] for i in keep), 1.0 / fps)


def _decode(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame of a video file as RGB uint8, and its frame rate."""
    try:
        import av
    except ImportError as exc:  # PyAV is a dependency; a broken install is the user's environment
        raise QvlcError("PyAV is not importable, so video files cannot be decoded",
                        fix="pip install av (or pass a folder of frames)", key="video") from exc
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError, ValueError) as exc:
        raise QvlcError(f"{str(path)!r} is not a readable video ({type(exc).__name__}: {exc})",
                        fix="pass a video file FFmpeg decodes (MP4, WebM, AVI, …) or a folder of frames",
                        key="video") from exc
    if not frames:
        raise QvlcError(f"{str(path)!r} has no video frames", fix="pass a video with frames", key="video")
    return frames, rate
