"""Config: native and vamc-style loading, and every check that runs before a weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.tiny import shipped_config, tiny_checkpoint
from qvlc.compile.plan import checked_plan
from qvlc.config.loading import config_from_dict, load_config
from qvlc.config.model_checks import check_against_model
from qvlc.errors import CheckpointError, ConfigError
from qvlc.models.common.tp import valid_tp_values
from qvlc.models.qwen2_vl import FAMILY as QWEN2_VL

REPO = Path(__file__).resolve().parents[1]


def llm(**export):
    return {"name": "x", "part": "llm", "export": export}


def error_of(raw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value


def test_defaults_resolve_to_tiny():
    cfg = config_from_dict({"name": "x", "part": "llm"})
    assert cfg.is_tiny and cfg.export.dtype == "fp32" and cfg.export.tp == 1
    assert cfg.artifact_dir == Path("build") / "x"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "examples").glob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.part in ("llm", "visual")


def test_unknown_key_suggests_closest():
    e = error_of(llm(prefil_len=128))
    assert e.key == "export.prefil_len" and "did you mean 'prefill_len'" in e.fix
    e = error_of({"name": "x", "part": "llm", "exprot": {}})
    assert e.key == "exprot" and "'export'" in e.fix


@pytest.mark.parametrize("raw,key,fragment", [
    (llm(tp="2"), "export.tp", "integer"),
    (llm(simplify="yes"), "export.simplify", "true or false"),
    (llm(dtype="bf16"), "export.dtype", "fp32"),
    ({"name": "x", "part": "audio"}, "part", "llm"),
    (llm(prefill_len=100), "export.prefill_len", "112"),
    (llm(max_context=300), "export.max_context", "304"),
    (llm(prefill_len=512, max_context=256), "export.prefill_len", "max_context"),
    (llm(prefill_len=256, max_context=256), "export.prefill_len", "max_context"),
    (llm(opset=13), "export.opset", "18"),
    (llm(tp=0), "export.tp", "positive"),
    ({"name": "x", "part": "visual", "export": {"max_patches": 1000}}, "export.max_patches", "1008"),
    ({"name": "x", "part": "visual", "export": {"tp": 2}}, "export.tp", "never split"),
    ({"name": "x", "part": "visual", "export": {"attention_block": 100}}, "export.attention_block", "multiple of 16"),
    ({"name": "a/b", "part": "llm"}, "name", "letters"),
    ({"part": "llm"}, "name", "add name"),
    ({"name": "x", "part": "llm", "validate": {"cases": ["small_image"]}}, "validate.cases", "not a case of the llm"),
    ({"name": "x", "part": "visual", "validate": {"cases": ["text_short"]}}, "validate.cases", "odd_grid"),
    ({"name": "x", "part": "llm", "validate": {"cases": ["all", "text_short"]}}, "validate.cases", "cannot be combined"),
    ({"name": "x", "part": "llm", "validate": {"cases": ["text_short", "text_short"]}}, "validate.cases", "twice"),
    ({"name": "x", "part": "llm", "validate": {"cases": ["chat"]}}, "validate.cases", "image_and_video"),
])
def test_bad_values_name_key_and_fix(raw, key, fragment):
    e = error_of(raw)
    assert e.key == key
    assert fragment in str(e)


def test_vamc_layout_maps_and_reports_ignored_keys():
    cfg = load_config(REPO / "examples" / "vamc_tiny_llm.yaml")
    assert (cfg.part, cfg.export.prefill_len, cfg.export.max_context, cfg.export.tp, cfg.export.dtype) == \
        ("llm", 128, 256, 2, "fp32")
    assert cfg.output.dir == "build"
    assert cfg.ignored == ("backend.target",)
    vis = config_from_dict({"name": "v", "frontend": {"shape": {"pixel_values": [512, 1176]},
                                                      "model_kwargs": {"build_visual": True}}})
    assert vis.part == "visual" and vis.export.max_patches == 512


def test_vamc_w8a16_gptq_maps_onto_calibrated_int8():
    """The vendor flow's int8 build: quantize type, backend.dtype int8 and the dataset block become export.weights;
    nothing of it is ignored."""
    cfg = load_config(REPO / "examples" / "vamc_qwen2_vl_7b_llm_int8.yaml")
    w = cfg.export.weights
    assert (cfg.export.dtype, cfg.export.opset, cfg.export.tp, w.format, w.method) == ("fp16", 21, 4, "int8", "gptq")
    assert (w.calibration.path, w.calibration.nsamples, w.calibration.seqlen) == ("data/calibration.jsonl", 128, 512)
    assert cfg.ignored == ()
    inline = config_from_dict({"name": "v", "frontend": {"quantize": {"type": "w8a16_gptq"},
                                                         "dataset": {"nsamples": 16}}, "backend": {"dtype": "int8"}})
    assert inline.export.weights.calibration.nsamples == 16 and inline.export.weights.calibration.path == ""


def test_vamc_bad_shape_is_explained():
    e = error_of({"name": "v", "frontend": {"shape": {"input_ids": [128, 256]}}})
    assert e.key == "frontend.shape.input_ids" and "[[2048], [4096]]" in e.fix


def test_missing_checkpoint_folder(tmp_path):
    cfg = config_from_dict({"name": "x", "part": "llm", "model": {"checkpoint": str(tmp_path / "nope")}})
    with pytest.raises(CheckpointError) as info:
        checked_plan(cfg)
    assert "does not exist" in str(info.value) and info.value.key == "model.checkpoint"


def test_not_qwen2_vl_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoint(tmp_path)
    assert "'llama'" in str(info.value) and "Qwen2-VL" in info.value.fix


def test_incomplete_sharded_checkpoint(tmp_path):
    shutil.copy(tiny_checkpoint() / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoint(tmp_path)
    assert "1 of 2 weight shards are missing" in str(info.value)


def test_checkpoint_without_weights(tmp_path):
    shutil.copy(tiny_checkpoint() / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        inspect_checkpoint(tmp_path)


def test_tp_refusals_name_the_numbers_and_valid_values():
    dims = QWEN2_VL.dims(shipped_config("qwen2_vl_7b"))  # 28 heads, 4 kv heads
    for tp, fragment in ((3, "28 attention heads are not divisible by 3"), (8, "28 attention heads")):
        with pytest.raises(ConfigError) as info:
            check_against_model(config_from_dict(llm(tp=tp)), dims, QWEN2_VL)
        assert fragment in str(info.value) and "tp = 1, 2, 4" in info.value.fix
    check_against_model(config_from_dict(llm(tp=4)), dims, QWEN2_VL)
    assert valid_tp_values(28, 4, 18944, 152064) == [1, 2, 4]
    # 2B: 12 heads and 2 kv heads; tp = 4 replicates each kv head on two ranks, tp = 6 cannot replicate evenly
    assert valid_tp_values(12, 2, 8960, 151936) == [1, 2, 4]


def test_prefill_must_hold_the_visual_tokens():
    dims = QWEN2_VL.dims(shipped_config("qwen2_vl_2b"))
    cfg = config_from_dict(llm(prefill_len=1024, max_context=4096, max_patches=5120))
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, dims, QWEN2_VL)
    assert "1280 visual tokens" in str(info.value) and "1296" in info.value.fix
    check_against_model(config_from_dict(llm(prefill_len=2048, max_context=4096, max_patches=5120)), dims, QWEN2_VL)


@pytest.mark.parametrize("raw", [
    {"name": "a", "part": "llm"},
    {"name": "a", "part": "llm", "export": {"max_patches": 1024, "prefill_len": 512, "max_context": 1024, "tp": 2}},
    {"name": "a", "part": "visual", "export": {"max_patches": 64, "chunk_width": 24, "dtype": "fp16"}},
])
def test_to_dict_round_trips(raw):
    cfg = config_from_dict(raw)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key, value, calls", [("generate_tokens", 200, 199), ("decode_steps", 150, 150)])
def test_a_refusal_quotes_the_number_the_user_wrote(key, value, calls):
    """`validate.generate_tokens: 200` is refused naming 200 (and the 199 decode calls it needs), so the reader
    finds their own number in the message."""
    raw = {**llm(prefill_len=128, max_context=256), "validate": {key: value}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert f"{key} {value} needs {calls} decode calls" in str(info.value)
    assert info.value.key == f"validate.{key}"
    assert f"use {key} <= {127 + (value - calls)}" in str(info.value)
