"""Images and videos from disk, as `qvlc run` takes them: image files, video files (decoded with PyAV) or folders
of frames, sampled as the Qwen processors sample them (NumPy + PIL; PyAV only for video files)."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qvlc.errors import QvlcError, printable, quoted

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_FPS = 2.0  # frames sampled per second of video (transformers' Qwen2-VL/Qwen2.5-VL processors)
MIN_FRAMES, MAX_FRAMES = 4, 768
MAX_IMAGE_PIXELS = 50_000_000  # ~7000 x 7000: far beyond any Qwen-VL max_pixels, far below a decompression bomb
MAX_VIDEO_BYTES = 2_000_000_000  # sampled frames kept in memory (RGB uint8), at most


class ImageError(QvlcError):
    """An image qvlc will not decode; ``reason`` says why in OpenAI's words (serve answers 400 with it)."""

    def __init__(self, problem: str, *, fix: str, key: str, reason: str = "invalid_image") -> None:
        self.reason = reason
        super().__init__(problem, fix=fix, key=key)


def open_image(source: bytes | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, what: str = "the image",
               key: str = "image") -> Image.Image:
    """The one bounded image open (`run`, `serve`, `eval`): sniff the format, check the header's size against
    ``max_pixels`` before a pixel is decoded (a 37 KB PNG can claim 13000 x 13000), decode, convert to RGB.
    ImageError naming ``what`` otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{what} is {w}x{h} = {w * h} pixels; qvlc decodes at most {max_pixels}",
                                     fix="pass a smaller image (the Qwen processors resize to at most a few million "
                                         "pixels anyway)", key=key, reason="image_too_large")
                im.load()
                return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is beyond the pixel limit ({exc})", fix="pass a smaller image", key=key,
                         reason="image_too_large") from None
    except (ImageError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 — Pillow's decoders raise any kind on damaged bytes (OSError, ValueError,
        #                       SyntaxError; TypeError for a TIFF tag of the wrong type, found by fuzzing)
        raise ImageError(f"{what} is not a readable image ({type(exc).__name__}: {printable(exc, 200)})",
                         fix="pass a valid image in a format Pillow reads (PNG, JPEG, WebP, GIF, BMP, TIFF)",
                         key=key) from None


def load_image(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as RGB; QvlcError (key ``image``) when it is missing, not a readable image, or larger
    than ``max_pixels`` (``open_image``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QvlcError(f"{quoted(str(p), 200)} " + ("is a folder, not an image file" if p.is_dir() else
                                                      "does not exist" if not p.exists() else "is not a regular file"),
                        fix="pass the path of an image file (PNG, JPEG, …)", key="image")
    return open_image(p, max_pixels=max_pixels, what=quoted(str(p), 200))


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video and the seconds between consecutive sampled frames."""

    frames: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each
    seconds_per_frame: float  # 1 / the sampling fps
    timestamps: tuple[float, ...] | None = None  # each sampled frame's time in the clip (None: i · seconds_per_frame)

    def frame_times(self) -> list[float]:
        return list(self.timestamps) if self.timestamps is not None else \
            [i * self.seconds_per_frame for i in range(len(self.frames))]

    def second_per_grid(self, temporal_patch_size: int) -> float:
        """Seconds covered by one temporal patch (Qwen2.5-VL's ``second_per_grid_ts``: temporal_patch_size / fps)."""
        return temporal_patch_size * self.seconds_per_frame


def sample_indices(total: int, video_fps: float, temporal_patch_size: int, fps: float = DEFAULT_FPS,
                   min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES, rule: str = "ramp") -> np.ndarray:
    """Frame indices to keep, as transformers 4.57.6's video processors pick them with ``fps`` (``rule``, from
    ``preprocess.json`` ``video_sampling``).

    ramp (``Qwen2VLVideoProcessor.sample_frames``): about ``fps`` frames per second, at least ``min_frames``,
    at most ``max_frames`` and the video's frames, rounded down to a multiple of ``temporal_patch_size``, spread
    evenly from frame 0. linspace (``Qwen3VLVideoProcessor.sample_frames``): int(seconds x fps) frames within the
    same bounds, from the first frame to the last (linspace, rounded); an odd count is padded later by repeating
    the last frame, as the processor does."""
    if rule == "linspace":
        n = min(min(max(int(total / video_fps * fps), min_frames), max_frames), total)
        return np.linspace(0, total - 1, n).round().astype(np.int64)
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
               fps: float = DEFAULT_FPS, rule: str = "ramp") -> Video:
    """A video file (a container qvlc knows: MP4/MOV, Matroska/WebM, AVI, FLV, Ogg, MPEG-TS) or a folder of frame
    images (sorted by name, taken as ``frames_fps`` frames per second), sampled to ``fps`` frames per second by
    ``rule`` (``sample_indices``; the artifact's ``preprocess.json`` ``video_sampling``). Only the
    sampled frames are decoded and kept, within ``MAX_VIDEO_BYTES``."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise QvlcError(f"the folder {quoted(str(p), 200)} holds no frame images ({', '.join(IMAGE_SUFFIXES)})",
                            fix="pass a video file, or a folder of frames named in order", key="video")
        keep = sample_indices(len(files), frames_fps, temporal_patch_size, fps, rule=rule)
        frames = [np.asarray(load_image(files[i])) for i in keep]
        _check_budget(len(keep), *frames[0].shape[:2])
        times = tuple(float(i) / frames_fps for i in keep)
    elif p.is_file():
        picked: dict = {}

        def pick(total: int, rate: float) -> np.ndarray:
            picked["keep"], picked["rate"] = sample_indices(total, rate, temporal_patch_size, fps, rule=rule), rate
            return picked["keep"]

        frames = _decode(p, pick)
        times = tuple(float(i) / picked["rate"] for i in picked["keep"])
    else:
        raise QvlcError(f"{quoted(str(p), 200)} " + ("does not exist" if not p.exists() else "is not a regular file"),
                        fix="pass a video file or a folder of frames", key="video")
    # transformers' processors report temporal_patch_size / fps seconds per temporal patch whatever the sampling
    # achieved (a short video padded up to min_frames included); the M-RoPE time positions follow that.
    return Video(tuple(frames), 1.0 / fps, times)


def _check_budget(frames: int, height: int, width: int) -> None:
    if frames * height * width * 3 > MAX_VIDEO_BYTES:
        raise QvlcError(f"{frames} sampled frames of {width}x{height} need {frames * height * width * 3 / 1e9:.1f} GB; "
                        f"qvlc keeps at most {MAX_VIDEO_BYTES / 1e9:.1f} GB of frames", key="--fps",
                        fix="sample fewer frames (a lower --fps) or pass a shorter or smaller video")


def container_format(path: Path) -> str:
    """The FFmpeg demuxer for the file's magic bytes; QvlcError for anything else (playlists, protocols, images):
    a playlist would make FFmpeg open other files and URLs, or wait forever for a live stream."""
    with open(path, "rb") as f:
        head = f.read(192)
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "mov"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if len(head) > 188 and head[0] == head[188] == 0x47:
        return "mpegts"
    raise QvlcError(f"{quoted(str(path), 200)} is not a readable video: not a container qvlc reads (MP4/MOV, "
                    "Matroska/WebM, AVI, FLV, Ogg, MPEG-TS); playlists and stream descriptions are never opened",
                    fix="pass a video file in one of those containers, or a folder of frames", key="video")


def _decode(path: Path, pick: Callable[[int, float], np.ndarray]) -> list[np.ndarray]:
    """The frames ``pick(total, rate)`` selects, decoded in one pass (the others are decoded and dropped, never
    converted or kept): the packets are counted first to know the total without decoding."""
    try:
        import av
    except ImportError as exc:  # PyAV is a dependency; a broken install is the user's environment
        raise QvlcError("PyAV is not importable, so video files cannot be decoded",
                        fix="pip install av (or pass a folder of frames)", key="video") from exc
    fmt = container_format(path)
    options = {"protocol_whitelist": "file"}
    try:
        with av.open(str(path), format=fmt, options=options) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
            total = sum(1 for packet in container.demux(stream) if packet.size)
        keep = pick(total, rate)
        with av.open(str(path), format=fmt, options=options) as container:
            stream = container.streams.video[0]
            if stream.codec_context is None:  # a stream whose codec FFmpeg does not know
                raise ValueError("FFmpeg has no decoder for its video stream")
            _check_budget(len(keep), stream.codec_context.height, stream.codec_context.width)
            wanted, frames = set(keep.tolist()), []
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == len(wanted):
                    break
    except (av.FFmpegError, IndexError, ValueError) as exc:
        raise QvlcError(f"{quoted(str(path), 200)} is not a readable video ({type(exc).__name__}: "
                        f"{printable(exc, 200)})", fix="pass a video file FFmpeg decodes (MP4, WebM, AVI, …) or a "
                        "folder of frames", key="video") from None
    if len(frames) != len(keep):
        raise QvlcError(f"{quoted(str(path), 200)} decoded to fewer frames than its {total} packets",
                        fix="re-encode the video (e.g. ffmpeg -i in.mp4 out.mp4)", key="video")
    return frames
