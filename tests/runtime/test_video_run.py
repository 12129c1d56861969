"""`qvlc run` with videos (and images) for every family: tokens equal transformers `generate` in fp32 on the tiny
models, fed the same pixels, grids and (Qwen2.5-VL) seconds per temporal patch; frames sampled as transformers'
video processor samples them; videos from a file (PyAV) and from a folder of frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qvlc.checkpoint.hf_model import load_checkpoint
from qvlc.cli.app import app
from qvlc.errors import QvlcError
from qvlc.models import FAMILIES
from qvlc.runtime.media import Video, load_video, sample_indices
from qvlc.runtime.vlm import VlmPipeline

S, C, N, NEW = 256, 288, 512, 10
PROMPT = "What happens?"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipe(request, compiled) -> VlmPipeline:
    ck = "tiny" if request.param == "qwen2_vl" else f"tiny:{request.param}"
    llm = compiled(f"video_llm_{request.param}", checkpoint=ck, validate={"enabled": False}, prefill_len=S,
                   max_context=C)
    vis = compiled(f"video_visual_{request.param}", part="visual", checkpoint=ck, validate={"enabled": False},
                   max_patches=N)
    return VlmPipeline(llm.folder, vis.folder)


def frames(n: int, h: int = 70, w: int = 100, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]  # a panning scene: frames differ


@torch.no_grad()
def generate_reference(p: VlmPipeline, images, videos) -> list[int]:
    prepared = p.prepare(images, PROMPT, videos)
    model = load_checkpoint(p.checkpoint).model
    kw = {}
    if len(prepared.grids("image")):
        kw.update(pixel_values=torch.from_numpy(prepared.pixels("image", p.visual_spec.patch_dim)),
                  image_grid_thw=torch.from_numpy(prepared.grids("image")))
    if len(prepared.grids("video")):
        kw.update(pixel_values_videos=torch.from_numpy(prepared.pixels("video", p.visual_spec.patch_dim)),
                  video_grid_thw=torch.from_numpy(prepared.grids("video")),
                  **p.family.oracle_video_kwargs(prepared.second_per_grid_ts))
    ids = torch.from_numpy(prepared.input_ids)[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("case", ["image", "video", "image_and_two_videos"])
def test_fp32_tokens_equal_generate(pipe, case):
    p = pipe
    clip = Video(tuple(frames(6)), 0.5)
    images, videos = [], [clip]
    if case == "image":
        images, videos = [Image.fromarray(frames(1, 150, 230, seed=5)[0])], []
    elif case == "image_and_two_videos":
        images = [Image.fromarray(frames(1, 90, 60, seed=5)[0])]
        videos = [clip, Video(tuple(frames(4, 56, 84, seed=9)), 0.5)]
    result = p.generate(images, PROMPT, max_new_tokens=NEW, stop_at_eos=False, videos=videos)
    assert result.tokens == generate_reference(p, images, videos)
    prepared = p.prepare(images, PROMPT, videos)
    assert prepared.grids("video")[:, 0].tolist() == [len(v.frames) // 2 for v in videos]


def test_tiny_video_bounds_come_from_the_checkpoint(pipe):
    """The tiny checkpoints ship a video_preprocessor_config.json (4..16 merged tokens per frame); preprocess.json
    carries its bounds, and the video grids honour them."""
    unit = (pipe.preprocess.patch_size * pipe.preprocess.merge_size) ** 2  # one merged token's pixels
    assert (pipe.preprocess.video_min_pixels, pipe.preprocess.video_max_pixels) == (4 * unit, 16 * unit)
    grid = pipe.prepare([], PROMPT, [Video(tuple(frames(2, 500, 700)), 0.5)]).grids("video")[0]
    assert 4 <= grid[1] * grid[2] // 4 <= 16


def test_video_changes_the_answer(pipe):
    p = pipe
    a = p.generate([], PROMPT, max_new_tokens=3, stop_at_eos=False, videos=[Video(tuple(frames(4)), 0.5)])
    b = p.generate([], PROMPT, max_new_tokens=3, stop_at_eos=False,
                   videos=[Video(tuple(frames(4, seed=11)), 0.5)])
    assert a.image_tokens == b.image_tokens > 0
    logits = [p.llm.logits_of(p.llm.prefill(*_window(p, v))) for v in (frames(4), frames(4, seed=11))]
    assert np.linalg.norm(logits[0] - logits[1]) > 1e-3 * np.linalg.norm(logits[0])


def _window(p: VlmPipeline, fr):
    prepared = p.prepare([], PROMPT, [Video(tuple(fr), 0.5)])
    w = p.llm.prompt_window(prepared.input_ids, p.media(prepared, p.vision_rows(prepared)))
    return w.embeds, w.positions, w.mask


@pytest.mark.parametrize("total,fps", [(10, 30.0), (100, 30.0), (7, 2.0), (3, 24.0), (2000, 25.0), (61, 29.97)])
def test_sampling_equals_transformers(total, fps):
    """Against transformers 4.57.6 Qwen2VLVideoProcessor.sample_frames (fps branch), its statements verbatim in
    torch: the processor module itself imports torchvision, which has no working wheel beside torch 2.13 here."""
    import math

    tps, min_frames, max_frames, target = 2, 4, 768, 2.0
    max_frames = math.floor(min(max_frames, total) / tps) * tps
    num_frames = total / fps * target
    num_frames = min(min(max(num_frames, min_frames), max_frames), total)
    num_frames = math.floor(num_frames / tps) * tps
    want = torch.arange(0, total, total / num_frames).int().numpy()
    got = sample_indices(total, fps, 2)
    np.testing.assert_array_equal(got, want)
    assert len(got) % 2 == 0


def test_file_and_frames_folder(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for f in frames(25, 48, 64):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = load_video(path)
    assert len(video.frames) == 4 and video.frames[0].shape == (48, 64, 3)  # 2.5 s at 2 fps → 5 → 4 (even)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames(6)):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    assert len(load_video(folder).frames) == 6 and load_video(folder).second_per_grid(2) == 1.0
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    for bad, fragment in ((tmp_path / "nope.mp4", "does not exist"), (tmp_path / "bad.mp4", "not a readable video"),
                          (tmp_path / "frames" / "000.png", "not a container qvlc reads")):  # an image is no video
        with pytest.raises(QvlcError, match=fragment):
            load_video(bad)


def test_cli_run_with_video_folder(pipe, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames(4, 32, 32)):  # one merged patch of every family (Qwen3-VL: 32 px)
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    res = CliRunner().invoke(app, ["run", str(pipe.llm_dir), str(pipe.visual_dir), "--video", str(folder),
                                   "--prompt", PROMPT, "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "1 video" in res.output and "Traceback" not in res.output
