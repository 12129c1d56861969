"""`part: visual` end to end on the tiny checkpoint: compile, validate, the artifact's contract, and the runtime."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qvlc.artifact.layout import PREPROCESS, VISUAL, VISUAL_WEIGHTS
from qvlc.checkpoint.processor import preprocess_config, read_preprocess_config
from qvlc.compile.plan import Plan, checked_plan
from qvlc.compile.stages import CompileResult, compile_artifact, load
from qvlc.config.loading import config_from_dict
from qvlc.errors import CheckpointError, QvlcError
from qvlc.host.preprocess import PreprocessConfig, images_to_patches
from qvlc.precision import Precision
from qvlc.runtime.visual import VisualRuntime
from qvlc.validate.metrics import ParityReport
from qvlc.validate.visual import validate_visual

N = 64


def visual_config(out: Path, **export) -> dict:
    return {"name": f"visual_{export.get('dtype', 'fp32')}", "part": "visual",
            "export": {"max_patches": N, **export}, "output": {"dir": str(out)}}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, CompileResult]:
    out = tmp_path_factory.mktemp("visual")
    return {
        "fp32": compile_artifact(config_from_dict(visual_config(out, dtype="fp32"))),
        # fp16, a non-default chunk width (64 = 24 + 24 + 16) and onnxsim
        "fp16": compile_artifact(config_from_dict(visual_config(out, dtype="fp16", chunk_width=24, simplify=True))),
    }


@pytest.fixture(scope="module")
def plan_ck(built):
    cfg = config_from_dict(visual_config(built["fp32"].folder.parent, dtype="fp32"))
    plan = checked_plan(cfg)
    return plan, load(plan)


def io_of(folder: Path) -> tuple[dict, dict]:
    model = onnx.load(str(folder / VISUAL), load_external_data=False)

    def table(values):
        return {v.name: ([d.dim_value for d in v.type.tensor_type.shape.dim],
                         onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values}

    return table(model.graph.input), table(model.graph.output)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_compile_passes_parity(built, dtype):
    r = built[dtype]
    assert r.report is not None and r.report.passed, r.report.failures
    cases = {c.case for c in r.report.checks}
    assert cases == {"small_image", "odd_grid", "extreme_aspect", "two_images", "video_t2", "heavy_padding"}
    assert {p.name for p in r.folder.iterdir()} == {VISUAL, VISUAL_WEIGHTS, PREPROCESS, "manifest.json",
                                                   "manifest.sha256", ".qvlc-artifact", "parity.json", "parity.md"}
    assert r.export.bytes_written == sum((r.folder / f).stat().st_size for f in (VISUAL, VISUAL_WEIGHTS, PREPROCESS))


def test_fp32_interface_default_chunk(built):
    inputs, outputs = io_of(built["fp32"].folder)
    assert inputs == {"pixel_values": ([N, 1176], "float32"), "attention_mask": ([1, N, N], "bool"),
                      "cos": ([N, 16], "float32"), "sin": ([N, 16], "float32")}
    assert outputs == {"image_embeds_0": ([N // 4, 64], "float32")}  # out_hidden 64 < 640: one chunk


def test_fp16_interface_chunks(built):
    folder = built["fp16"].folder
    inputs, outputs = io_of(folder)
    assert inputs["pixel_values"] == ([N, 1176], "float16") and inputs["attention_mask"] == ([1, N, N], "bool")
    assert outputs == {"image_embeds_0": ([N // 4, 24], "float16"), "image_embeds_1": ([N // 4, 24], "float16"),
                       "image_embeds_2": ([N // 4, 16], "float16")}
    manifest = json.loads((folder / "manifest.json").read_text())
    v = manifest["visual"]
    assert (v["max_patches"], v["chunk_widths"], v["dtype"], v["merge_size"], v["head_dim"]) == \
        (N, [24, 24, 16], "fp16", 2, 16)
    assert [g["file"] for g in manifest["graphs"]] == [VISUAL]
    assert manifest["parity"]["passed"] is True
    chunk_checks = {c.output for c in built["fp16"].report.checks}
    assert chunk_checks == {"image_embeds_0", "image_embeds_1", "image_embeds_2", "image_embeds"}


def test_preprocess_json(built, plan_ck):
    plan, _ = plan_ck
    pre = PreprocessConfig.from_json((built["fp32"].folder / PREPROCESS).read_text())
    assert pre == read_preprocess_config(plan.checkpoint)
    v = plan.dims.vision
    assert (pre.patch_size, pre.temporal_patch_size, pre.merge_size) == (v.patch_size, v.temporal_patch_size,
                                                                         v.merge_size)


def test_preprocess_disagreeing_with_vision_config(tmp_path, plan_ck):
    plan, _ = plan_ck
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"merge_size": 3}))
    with pytest.raises(CheckpointError, match="merge_size"):
        preprocess_config(tmp_path, plan.dims.vision)
    (tmp_path / "preprocessor_config.json").unlink()  # absent: sizes follow the vision config
    assert preprocess_config(tmp_path, plan.dims.vision).merge_size == plan.dims.vision.merge_size


def _perturb_one_tensor(folder: Path, name_part: str, scale: float) -> str:
    """Add noise of ``scale`` x mean|w| to the external initializer whose name contains ``name_part``."""
    model = onnx.load(str(folder / VISUAL), load_external_data=False)
    init = next(i for i in model.graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL and name_part in i.name)
    loc = {e.key: e.value for e in init.external_data}
    offset, length = int(loc["offset"]), int(loc["length"])
    with open(folder / loc["location"], "r+b") as f:
        f.seek(offset)
        w = np.frombuffer(f.read(length), dtype=np.float32).copy()
        w += np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * scale * np.abs(w).mean()
        f.seek(offset)
        f.write(w.tobytes())
    return init.name


# The tiny tower's blocks add ~12% to a residual stream the merger then normalises, so a block weight needs a
# larger nudge than the merger to move the output past the fp32 tolerance (1e-4 relative).
@pytest.mark.parametrize("name_part, scale", [("merger.fc2", 0.01), ("blocks.1.mlp.fc2", 0.1)])
def test_perturbed_weight_fails_validation(built, plan_ck, tmp_path, name_part, scale):
    plan, ck = plan_ck
    copy = tmp_path / "copy"
    shutil.copytree(built["fp32"].folder, copy)
    clean = ParityReport("visual", Precision.FP32)
    validate_visual(plan, ck, copy, clean)
    assert clean.passed, clean.failures
    name = _perturb_one_tensor(copy, name_part, scale)
    report = ParityReport("visual", Precision.FP32)
    validate_visual(plan, ck, copy, report)
    assert not report.passed, f"perturbing {name} went unnoticed"
    failed_cases = {c.case for c in report.checks if not c.passed}
    assert len(failed_cases) == 6  # every failure collected, not just the first


def test_interface_mismatch_is_reported_not_raised(built, plan_ck):
    plan, ck = plan_ck
    cfg = dataclasses.replace(plan.cfg, export=dataclasses.replace(plan.cfg.export, chunk_width=24))
    report = ParityReport("visual", Precision.FP32)
    validate_visual(Plan(cfg, plan.checkpoint, plan.family, plan.dims), ck, built["fp32"].folder, report)
    problems = {c.output: c.problem for c in report.checks if not c.passed}
    assert set(problems) == {"image_embeds_0", "image_embeds_1", "image_embeds_2"}
    assert "contract" in problems["image_embeds_0"] and "missing" in problems["image_embeds_1"]
    assert not any(c.metrics for c in report.checks)  # values skipped once the interface is wrong


def test_runtime_matches_transformers(built, plan_ck):
    _, ck = plan_ck
    rt = VisualRuntime(built["fp32"].folder)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8), rng.integers(0, 256, size=(30, 120, 3),
                                                                                    dtype=np.uint8)]
    emb, grids = rt.encode_images(images)
    pixels, _ = images_to_patches(images, rt.preprocess)
    with torch.no_grad():
        ref = ck.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)).numpy()
    assert emb.shape == ref.shape == (int(grids.prod(axis=1).sum()) // 4, 64)
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=1e-4)


def test_runtime_rejects_too_many_patches(built):
    rt = VisualRuntime(built["fp16"].folder)
    grids = [[1, 8, 10]]  # 80 patches > N = 64
    with pytest.raises(QvlcError, match="max_patches"):
        rt.run(np.zeros((80, 1176), dtype=np.float32), grids)
    with pytest.raises(QvlcError, match="pixel_values"):
        rt.run(np.zeros((10, 1176), dtype=np.float32), [[1, 4, 4]])


def test_validate_cases_choose_the_visual_cases(compiled):
    r = compiled("visual_two_cases", part="visual", max_patches=256, validate={"cases": ["odd_grid", "video_t2"]})
    assert r.report.passed, r.report.failures
    assert r.report.cases == {"run": ["odd_grid", "video_t2"],
                              "skipped": ["small_image", "extreme_aspect", "two_images", "heavy_padding"]}
    assert {c.case for c in r.report.checks if c.metrics} == {"odd_grid", "video_t2"}
    assert {p["phase"] for p in r.report.phases} == {"oracle", "graph (onnxruntime)"}
    assert "validate.cases: small_image, extreme_aspect, two_images, heavy_padding skipped" in \
        (r.folder / "parity.md").read_text()
