"""Weight-only quantization of the LLM part (export.weights), proven twice on the tiny checkpoint through the real
loading path: exactness against transformers' layers carrying the same dequantized integers, and the error against
the unquantized model. A wrong scale, a swapped zero point or mis-packed nibbles in a compiled artifact are caught."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qvlc.compile.plan import checked_plan
from qvlc.compile.stages import compile_artifact, validate_artifact
from qvlc.config.loading import config_from_dict
from qvlc.errors import ConfigError, ParityError
from qvlc.weights.quant import quantize_rtn

LEN = {"prefill_len": 64, "max_context": 96}
LINEARS_PER_LAYER, LAYERS = 7, 2  # the tiny model's decoder


def _inits(path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_int8_fp32_is_exact_and_reports_its_error(compiled):
    """fp32 activations: the usual fp32 tolerances and greedy tokens equal, against the dequantized model; every
    decoder Linear is INT8 + per-axis DequantizeLinear; the error against the unquantized model is reported."""
    r = compiled("q_int8", opset=21, weights={"format": "int8"}, **LEN)
    assert r.report.passed, r.report.failures
    assert all(t.passed and t.required for t in r.report.tokens)
    graph = onnx.load(str(r.folder / "llm_prefill.onnx"), load_external_data=False)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == LINEARS_PER_LAYER * LAYERS and all(a.i == 1 for n in dq for a in n.attribute if a.name == "axis")
    inits = _inits(r.folder / "llm_prefill.onnx")
    assert inits["stack.layers.1.mlp.down_proj.weight_t.q"].data_type == TensorProto.INT8
    assert "stack.layers.1.mlp.down_proj.weight_t" not in inits
    assert inits["stack.lm_head.weight_t"].data_type == TensorProto.FLOAT  # include: [llm] leaves the head
    q = json.loads((r.folder / "parity.json").read_text())["quantization_error"]
    assert q["format"] == "int8" and q["min_cosine"] == 0.98 and q["checks"]
    assert all(c["passed"] for c in q["checks"]) and min(c["cosine"] for c in q["checks"]) < 0.99999
    assert "## Quantization error" in (r.folder / "parity.md").read_text()


@pytest.mark.parametrize("dequantize,runtimes", [("blocked", ["onnxruntime"]), ("explicit", ["onnxruntime", "tvm"])])
def test_int4_ranks_split_their_groups(compiled, dequantize, runtimes):
    """int4 in groups of 32 at tp = 2, fp16: each rank's integers are its slice of the whole weight's (o_proj and
    down_proj split by input rows, whole groups per rank); blocked writes two integers a byte, explicit one a byte
    and also runs on TVM."""
    r = compiled(f"q_int4_{dequantize}", dtype="fp16", opset=21, tp=2, validate={"runtimes": runtimes},
                 weights={"format": "int4", "group_size": 32, "include": ["llm", "lm_head"], "dequantize": dequantize},
                 **LEN)
    assert r.report.passed, r.report.failures
    assert {c.runtime for c in r.report.checks} == set(runtimes)
    inits = _inits(r.folder / "rank1" / "llm_prefill.onnx")
    q = inits["stack.layers.0.mlp.down_proj.weight_t.q"]  # [intermediate / 2, hidden]
    n_in, n_out = q.dims
    scale = inits["stack.layers.0.mlp.down_proj.weight_t.scale"]
    if dequantize == "blocked":
        assert q.data_type == TensorProto.INT4 and int(next(e.value for e in q.external_data if e.key == "length")) \
            == n_in * n_out // 2
        assert list(scale.dims) == [n_in // 32, n_out]
    else:
        assert q.data_type == TensorProto.INT8 and list(scale.dims) == [n_in // 32, 1, n_out]
    assert "stack.lm_head.weight_t.q" in inits


def _rewrite(folder, name: str, edit, graphs=("llm_prefill.onnx", "llm_decode.onnx")) -> None:
    """Apply ``edit`` (NumPy array → array) to initializer ``name`` in the graphs' storage, wherever it lives."""
    for graph in graphs:
        model = onnx.load(str(folder / graph), load_external_data=False)
        init = next(i for i in model.graph.initializer if i.name == name)
        if init.data_location == TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            path, off, n = folder / ext["location"], int(ext["offset"]), int(ext["length"])
            data = bytearray(path.read_bytes())
            data[off:off + n] = edit(np.frombuffer(bytes(data[off:off + n]), np.uint8)).tobytes()
            path.write_bytes(bytes(data))
            return  # prefill and decode share the weights file
        init.raw_data = edit(np.frombuffer(init.raw_data, np.uint8)).tobytes()
        onnx.save(model, str(folder / graph))


def _scale_x2(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.float32) * 2).view(np.uint8)


def _swap_zero_points(raw: np.ndarray) -> np.ndarray:  # two channels' zero points (UINT4: two per byte)
    out = raw.copy()
    out[[0, 1]] = out[[1, 0]] if out[0] != out[1] else out[[0, 1]] ^ 0x11
    return out


def _swap_nibbles(raw: np.ndarray) -> np.ndarray:  # the packing order of INT4 pairs reversed
    return ((raw >> 4) | (raw << 4)).astype(np.uint8)


@pytest.mark.parametrize("tamper,target", [(_scale_x2, "scale"), (_swap_zero_points, "zero_point"),
                                           (_swap_nibbles, "q")])
def test_wrong_scale_zero_point_or_nibble_order_is_caught(compiled, copy_artifact, reseal, tamper, target):
    r = compiled("q_int4_asym", opset=21, weights={"format": "int4", "group_size": 32, "symmetric": False}, **LEN)
    assert r.report.passed, r.report.failures
    folder = copy_artifact(r.folder)
    _rewrite(folder, f"stack.layers.0.mlp.up_proj.weight_t.{target}", tamper)
    reseal(folder)
    report = validate_artifact(folder)
    assert not report.passed and any(f.startswith(("prefill/", "decode/")) for f in report.failures)


def test_the_error_floor_is_a_verdict(tmp_path):
    cfg = config_from_dict({"name": "q", "part": "llm", "model": {"checkpoint": "tiny"},
                            "export": {"opset": 21, **LEN, "weights": {"format": "int8", "min_cosine": 0.999999}},
                            "output": {"dir": str(tmp_path)}})
    with pytest.raises(ParityError) as info:
        compile_artifact(cfg)
    assert "quantization error/" in str(info.value) and "export.weights.min_cosine" in str(info.value)


@pytest.mark.parametrize("weights,extra,key,fragment", [
    ({"format": "int4", "group_size": 64}, {"tp": 2}, "export.weights.group_size", "use group_size 16, 32"),
    ({"format": "int4", "group_size": 48}, {}, "export.weights.group_size", "does not divide"),
    ({"format": "int8", "method": "gptq", "calibration": {"seqlen": 8}}, {}, "export.weights.calibration.seqlen",
     "not in [16"),
    ({"format": "int8", "calibration": {"nsamples": 64}}, {}, "export.weights.calibration", "remove"),
    ({"format": "int8", "include": ["visual"]}, {}, "export.weights.include", "quantizes nothing of the llm part"),
    ({"format": "int8", "include": ["vision"]}, {}, "export.weights.include", "unknown 'vision'"),
    ({"format": "int4"}, {"opset": 18}, "export.opset", "opset >= 21"),
    ({"format": "int8"}, {"opset": 18}, "export.opset", "opset >= 19"),
    ({"format": "int8", "min_cosine": 1.5}, {}, "export.weights.min_cosine", "not in [0, 1)"),
    ({"format": "int8"}, {"fp32_layers": ["lm_head"], "dtype": "fp16"}, "export.fp32_layers", "not supported yet"),
    ({"format": "int4", "group_size": 32}, {"runtimes": ["onnxruntime", "tvm"]}, "export.weights.dequantize",
     "dequantize: explicit"),
])
def test_bad_weight_configs_refused_before_loading(weights, extra, key, fragment):
    runtimes = extra.pop("runtimes", ["onnxruntime"])
    export = {"opset": 21, "tp": 1, **extra, "weights": weights}
    with pytest.raises(ConfigError) as info:
        checked_plan(config_from_dict({"name": "x", "part": "llm", "export": export, "validate": {"runtimes": runtimes}}))
    assert info.value.key == key and fragment in str(info.value), str(info.value)


VISUAL = {"tiny": ({"format": "int8", "include": ["visual"]}, {}, 2 * 4 + 2),
          "tiny:qwen2_5_vl": ({"format": "int4", "group_size": 16, "symmetric": False, "dequantize": "explicit",
                               "include": ["llm", "lm_head", "visual"]}, {"dtype": "fp16"}, 4 * 5 + 2)}


def _visual(compiled, checkpoint: str, runtimes=("onnxruntime",)):
    weights, extra, _ = VISUAL[checkpoint]
    return compiled(f"vq_{checkpoint[-5:]}", part="visual", checkpoint=checkpoint, opset=21, max_patches=256,
                    weights=weights, validate={"runtimes": list(runtimes)}, **extra)


@pytest.mark.parametrize("checkpoint,runtimes", [("tiny", ["onnxruntime"]), ("tiny:qwen2_5_vl", ["onnxruntime", "tvm"])])
def test_visual_tower_quantized_is_exact_and_reports_its_error(compiled, checkpoint, runtimes):
    """include: [visual]: every Linear of the blocks and the merger carries integers (not the patch embedding), the
    graph is exact against the tower carrying the dequantized integers (Qwen2.5-VL's int4 explicit also on TVM), and
    each case's error against the unquantized tower is reported. One weights block serves both parts' configs."""
    r = _visual(compiled, checkpoint, runtimes)
    assert r.report.passed, r.report.failures
    assert {c.runtime for c in r.report.checks} == set(runtimes)
    inits = _inits(r.folder / "visual.onnx")
    q = [n for n in inits if n.endswith(".weight_t.q")]
    assert len(q) == VISUAL[checkpoint][2] and "merger.fc2.weight_t.q" in q and "patch_embed.weight_t" in inits
    record = json.loads((r.folder / "parity.json").read_text())["quantization_error"]
    assert record["reference"].startswith("the unquantized vision tower") and len(record["checks"]) == 6
    assert all(c["passed"] for c in record["checks"]) and min(c["cosine"] for c in record["checks"]) < 0.999999


def test_visual_wrong_scale_is_caught(compiled, copy_artifact, reseal):
    r = _visual(compiled, "tiny")
    folder = copy_artifact(r.folder)
    _rewrite(folder, "blocks.1.mlp.fc1.weight_t.scale", _scale_x2, graphs=("visual.onnx",))
    reseal(folder)
    report = validate_artifact(folder)
    assert not report.passed and any(f.startswith("visual/") for f in report.failures)


@pytest.mark.parametrize("weights,key,fragment", [
    ({"format": "int8"}, "export.weights.include", "quantizes nothing of the visual part"),
    ({"format": "int8", "include": ["visual"], "method": "gptq"}, "export.weights.method", "round to nearest"),
])
def test_visual_weight_configs_refused(weights, key, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "x", "part": "visual", "export": {"opset": 21, "weights": weights}})
    assert info.value.key == key and fragment in str(info.value)


def test_qwen2_5_vl_tower_has_no_int4_group_size():
    """Qwen2.5-VL's vision MLP has 3420 input rows: no multiple of 16 divides it, so int4 is refused naming int8."""
    from qvlc.checkpoint.tiny import shipped_config
    from qvlc.config.model_checks import _weight_groups
    from qvlc.models import family as family_of

    fam = family_of("qwen2_5_vl")
    dims = fam.dims(shipped_config("qwen2_5_vl_7b", fam))
    cfg = config_from_dict({"name": "x", "part": "visual", "export": {"opset": 21, "weights": {
        "format": "int4", "include": ["visual"]}}})
    with pytest.raises(ConfigError) as info:
        _weight_groups(cfg, dims)
    assert "3420" in str(info.value) and "format int8" in info.value.fix


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_rank_slice_dequantizes_to_the_slice_of_the_whole(bits, group, symmetric):
    w = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    qw = quantize_rtn(w, bits, group, symmetric)
    whole = qw.dequantize(np.dtype(np.float16))
    for dim, start, length in ((0, 16, 16), (1, 32, 32), (1, 0, 16)):
        part = qw.narrow(dim, start, length).dequantize(np.dtype(np.float16))
        assert np.array_equal(part, np.take(whole, range(start, start + length), axis=dim))
    assert ml_dtypes.int4  # the dtype the blocked graphs store



def test_validate_with_tvm_refuses_blocked_int4_before_running(compiled):
    from qvlc.compile.stages import validate_artifact

    r = compiled("q_int4_asym", opset=21, weights={"format": "int4", "group_size": 32, "symmetric": False}, **LEN)
    with pytest.raises(ConfigError) as info:
        validate_artifact(r.folder, runtimes=("tvm",))
    assert info.value.key == "export.weights.dequantize"


def test_7b_int8_memory_on_a_16_gib_runner(monkeypatch):
    """The shipped 7B int8 config (workers 1) and the vendor's GPTQ config (calibration at 128 x 512) fit 16 GiB; two
    int8 export workers do not (each holds a rank's dequantized weights and its integers: 7.40 GiB measured at
    workers 1), and the refusal names export.workers."""
    from pathlib import Path

    from qvlc.checkpoint.tiny import shipped_config
    from qvlc.compile.memory_estimate import check_memory, estimate
    from qvlc.config.loading import load_config
    from qvlc.models import family as family_of

    monkeypatch.setenv("QVLC_MEMORY_LIMIT_GB", "16")
    repo = Path(__file__).parents[2]
    dims = family_of("qwen2_vl").dims(shipped_config("qwen2_vl_7b"))
    raw = load_config(repo / "configs" / "qwen2_vl_7b_llm_int8.yaml").to_dict()
    check_memory(config_from_dict(raw), dims)
    gptq = load_config(repo / "examples" / "vamc_qwen2_vl_7b_llm_int8.yaml")
    check_memory(gptq, dims)
    assert "GPTQ calibration" in estimate(gptq, dims).describe()
    raw["export"]["workers"] = 2
    with pytest.raises(ConfigError) as info:
        check_memory(config_from_dict(raw), dims)
    assert info.value.key == "export.workers"


def test_qwen3_vl_int4_both_parts_exact_with_pos_embed_and_norms_unquantized(compiled):
    """Qwen3-VL at int4 (groups of 16, asymmetric): the LLM with q/k norms and no q/k/v biases, and the
    tower with its DeepStack mergers. Every Linear carries integers; the position table, the patch embedding and
    every norm stay floating point; both graphs are exact against transformers' modules carrying the same
    dequantized integers, and the error against the unquantized model is reported."""
    weights = {"format": "int4", "group_size": 16, "symmetric": False, "include": ["llm", "lm_head", "visual"]}
    llm = compiled("q3_int4_llm", checkpoint="tiny:qwen3_vl", dtype="fp16", opset=21, weights=weights, **LEN)
    visual = compiled("q3_int4_vis", part="visual", checkpoint="tiny:qwen3_vl", dtype="fp16", opset=21,
                      max_patches=256, weights=weights)
    for r in (llm, visual):
        assert r.report.passed, r.report.failures
        q = r.report.quantization
        assert q["format"] == "int4" and q["checks"] and all(c["passed"] for c in q["checks"])
    rank = _inits(llm.folder / "llm_prefill.onnx")
    assert len([n for n in rank if n.endswith(".q")]) == LINEARS_PER_LAYER * 3 + 1  # 3 decoder layers + lm_head
    assert not [n for n in rank if "norm" in n and n.endswith(".q")] and [n for n in rank if "q_norm" in n]
    tower = _inits(visual.folder / "visual.onnx")
    q = sorted(n for n in tower if n.endswith(".q"))
    assert len(q) == 3 * 4 + 2 + 2 * 2  # 3 blocks x (qkv, proj, fc1, fc2), the merger, 2 DeepStack mergers
    assert any("deepstack_merger_list.1" in n for n in q)
    assert not [n for n in q if "pos_embed" in n or "patch_embed" in n or "norm" in n]
    # the position table (8 x 8 rows of 32; the exporter names its folded copies val_*) stays fp16
    tables = [t for n, t in tower.items() if list(t.dims) == [64, 32] and not n.endswith(".q")]
    assert tables and {t.data_type for t in tables} == {TensorProto.FLOAT16}
    assert all(t.expected == t.got for t in llm.report.tokens if t.required) and llm.report.tokens
