"""Qwen2.5-VL compiles end to end on its tiny default (save_pretrained → from_pretrained), both parts, fp32 and
fp16, tensor-parallel LLM ranks; the parity report proves each against transformers' Qwen2.5-VL classes."""

from __future__ import annotations

import json

import pytest

from qvlc.compile.plan import checked_plan
from qvlc.config.loading import config_from_dict, load_config
from qvlc.errors import CheckpointError, ConfigError

CK = "tiny:qwen2_5_vl"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_visual_passes_with_window_cases(compiled, dtype):
    r = compiled(f"q25_visual_{dtype}", part="visual", checkpoint=CK, dtype=dtype, max_patches=256, chunk_width=24)
    assert r.report.passed, r.report.failures
    cases = {c.case for c in r.report.checks}
    assert {"odd_grid", "small_image", "two_images", "video_t2", "heavy_padding", "extreme_aspect"} <= cases
    m = json.loads((r.folder / "manifest.json").read_text())
    assert m["family"] == "qwen2_5_vl"
    assert (m["visual"]["window"], m["visual"]["fullatt_blocks"], m["visual"]["chunk_widths"]) == (2, [1, 3],
                                                                                                  [24, 24, 16])
    inputs = [i["name"] for i in m["graphs"][0]["inputs"]]
    assert inputs == ["pixel_values", "attention_mask", "window_attention_mask", "cos", "sin"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_visual_attention_in_blocks_passes(compiled, family):
    """export.attention_block 48 on N = 256: every vision block's attention is 6 softmaxes over 48 (last: 16)
    query rows in the graph, and the artifact passes the same parity as the one-block graph."""
    import onnx

    r = compiled(f"blocked_visual_{family}", part="visual", checkpoint=f"tiny:{family}", dtype="fp16",
                 max_patches=256, attention_block=48)
    assert r.report.passed, r.report.failures
    graph = onnx.load(str(r.folder / "visual.onnx"), load_external_data=False).graph
    from qvlc.checkpoint.tiny import tiny_checkpoint
    from qvlc.models import family as family_of

    config = json.loads((tiny_checkpoint(family=family_of(family)) / "config.json").read_text())
    depth = config["vision_config"]["depth"]
    assert sum(n.op_type == "Softmax" for n in graph.node) == 6 * depth


@pytest.mark.parametrize("tp,dtype", [(1, "fp32"), (2, "fp16")])
def test_llm_passes(compiled, tp, dtype):
    r = compiled(f"q25_llm_tp{tp}_{dtype}", checkpoint=CK, dtype=dtype, tp=tp, prefill_len=128, max_context=192)
    assert r.report.passed, r.report.failures
    cases = {c.case for c in r.report.checks if c.graph == "prefill"}
    assert "image_and_video" in cases  # video positions use Qwen2.5-VL's seconds (truncated), checked vs transformers
    assert all(t.expected == t.got for t in r.report.tokens) and len(r.report.tokens) == 4
    if tp > 1:
        assert {c.graph for c in r.report.checks} >= {"prefill vs tp=1", "decode vs tp=1"}


def test_vamc_fullatt_blocks_checked_against_config_json():
    cfg = config_from_dict({"name": "v", "frontend": {"checkpoint": CK, "shape": {"pixel_values": [256, 1176]},
                                                      "model_kwargs": {"build_visual": True}},
                            "backend": {"compile": {"fullatt_block_indexes": [7, 15, 23, 31]}}})
    with pytest.raises(ConfigError) as info:
        checked_plan(cfg)
    assert "[7, 15, 23, 31]" in str(info.value) and "[1, 3]" in str(info.value)
    assert info.value.key == "backend.compile.fullatt_block_indexes"


def test_vamc_example_reads_as_is():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    cfg = load_config(examples / "vamc_qwen2_5_vl_7b_visual.yaml")
    assert cfg.declared_fullatt_blocks == (7, 15, 23, 31) and cfg.declared_patch_dim == 1176 and not cfg.ignored
    plan = checked_plan(load_config(examples / "vamc_tiny_qwen2_5_vl_visual.yaml"))
    assert plan.family.model_type == "qwen2_5_vl"


def test_patch_width_and_unknown_tiny_refused():
    cfg = config_from_dict({"name": "v", "frontend": {"checkpoint": CK, "shape": {"pixel_values": [256, 1000]},
                                                      "model_kwargs": {"build_visual": True}}})
    with pytest.raises(ConfigError, match="1176"):
        checked_plan(cfg)
    with pytest.raises(CheckpointError, match="tiny:qwen2_5_vl"):
        checked_plan(config_from_dict({"name": "x", "part": "llm", "model": {"checkpoint": "tiny:llama"}}))
