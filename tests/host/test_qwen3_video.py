"""Qwen3-VL's video processor, reproduced on the host: frame sampling and the whole-clip pixel budget, checked
against transformers 4.57.6's own functions (read from its source: the module itself imports torchvision)."""

from __future__ import annotations

import ast
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import transformers

from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.processor import preprocess_config
from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.errors import QvlcError
from qvlc.host.preprocess import PreprocessConfig, smart_resize_clip, video_to_patches
from qvlc.models import family
from qvlc.runtime.media import sample_indices

SOURCE = "models/qwen3_vl/video_processing_qwen3_vl.py"


def _transformers_functions() -> dict:
    """transformers' ``smart_resize`` and ``Qwen3VLVideoProcessor.sample_frames``, compiled from its source."""
    path = transformers.__file__.replace("__init__.py", SOURCE)
    tree = ast.parse(open(path).read())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen3VLVideoProcessor")
    keep += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames"]
    namespace = {"math": math, "np": np, "Optional": object, "Union": object, "VideoMetadata": object,
                 "logger": SimpleNamespace(warning_once=print)}
    for node in keep:
        node.returns = None
        for arg in node.args.args:
            arg.annotation = None
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def hf():
    return _transformers_functions()


@pytest.mark.parametrize("video_fps", [30.0, 29.97, 24.0, 2.0, 1.0])
@pytest.mark.parametrize("fps", [2.0, 1.0, 0.5])
def test_frame_sampling_is_transformers_qwen3(hf, video_fps, fps):
    processor = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    for total in range(1, 400):
        meta = SimpleNamespace(total_num_frames=total, fps=video_fps)
        want = hf["sample_frames"](processor, meta, fps=fps)
        np.testing.assert_array_equal(sample_indices(total, video_fps, 2, fps, rule="linspace"), want)


def test_the_pixel_budget_holds_for_the_whole_clip(hf):
    rng = np.random.default_rng(0)
    for _ in range(3000):
        frames, h, w = int(rng.integers(2, 80)), int(rng.integers(32, 2000)), int(rng.integers(32, 2000))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = 128 * 32 * 32, 32 * 32 * int(rng.choice([768, 6144, 24576]))
        assert smart_resize_clip(frames, h, w, 2, 32, lo, hi) == hf["smart_resize"](frames, h, w, 2, 32, lo, hi)
    with pytest.raises(QvlcError, match="needs at least 2"):  # transformers refuses one frame too
        smart_resize_clip(1, 64, 64, 2, 32, 4096, 16384)
    # longer clips get smaller frames: the budget is over t x h x w, not per frame
    assert smart_resize_clip(64, 720, 1280, 2, 32, 4096, 32 * 32 * 768)[0] < \
        smart_resize_clip(4, 720, 1280, 2, 32, 4096, 32 * 32 * 768)[0]


def test_the_family_sets_its_video_rules_in_preprocess_json():
    fam = family("qwen3_vl")
    ck = tiny_checkpoint(family=fam)
    q3 = preprocess_config(ck, inspect_checkpoint(ck)[1].vision, fam.video_rules)
    assert (q3.video_sampling, q3.video_budget, q3.factor) == ("linspace", "clip", 32)
    q2 = preprocess_config(tiny_checkpoint(), inspect_checkpoint(tiny_checkpoint())[1].vision,
                           family("qwen2_vl").video_rules)
    assert (q2.video_sampling, q2.video_budget) == ("ramp", "frame")
    old = json.loads(PreprocessConfig().to_json())
    del old["video_sampling"], old["video_budget"]  # an artifact from before the keys: Qwen2-VL's rules
    assert PreprocessConfig.from_dict(old) == PreprocessConfig()
    clip = np.zeros((6, 96, 128, 3), np.uint8)
    _, grid = video_to_patches(clip, q3)
    h, w = smart_resize_clip(6, 96, 128, 2, 32, q3.video_min_pixels, q3.video_max_pixels)
    assert grid.tolist() == [3, h // 16, w // 16]
