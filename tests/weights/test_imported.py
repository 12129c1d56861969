"""Quantized checkpoints imported without requantizing: tiny GPTQ (4 and 8 bits, symmetric and not, per group and
per channel) and AWQ (GEMM) checkpoints packed by this file's own packer from the tiny model, compiled through the
real loading path. The integers, scales and zero points in the graphs are exactly the checkpoint's."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.compile.plan import checked_plan
from qvlc.compile.stages import compile_artifact
from qvlc.config.loading import config_from_dict
from qvlc.errors import CheckpointError, ConfigError

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ = (0, 2, 4, 6, 1, 3, 5, 7)


def _quantize(w: np.ndarray, bits: int, group: int, sym: bool, rng):
    """Unsigned integers [out, in], zero points and scales [out, groups] (random rounding: not our RTN)."""
    out, n = w.shape
    g = w.reshape(out, n // group, group)
    qmax = 2**bits - 1
    if sym:
        scale = np.abs(g).max(axis=2) / (qmax // 2)
        zero = np.full(scale.shape, 2 ** (bits - 1))
    else:
        lo, hi = g.min(axis=2), g.max(axis=2)
        scale = (hi - lo) / qmax
        zero = np.clip(np.round(-lo / scale), 0, qmax)
    scale = scale.astype(np.float16)
    q = np.clip(np.floor(g / scale[..., None].astype(np.float32) + rng.random(g.shape)) + zero[..., None], 0, qmax)
    return q.reshape(out, n).astype(np.uint32), zero.astype(np.uint32), scale


def _pack(values: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Unsigned values → int32 words, 32/bits per word along ``axis``; word position k holds element order[k]."""
    per = 32 // bits
    v = np.moveaxis(values, axis, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    if order is not None:
        v = v[..., list(order)]
    words = np.zeros(v.shape[:-1], np.uint32)
    for k in range(per):
        words |= v[..., k].astype(np.uint32) << np.uint32(bits * k)
    return np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32)  # safetensors saves the buffer as is


def write_quantized(dst, method: str, bits: int, group: int, sym: bool, desc_act: bool = False, family=None):
    """The tiny checkpoint (of ``family``: default Qwen2-VL) with every decoder Linear replaced by its packed form;
    returns the integers used."""
    src = tiny_checkpoint(family=family)
    shutil.copytree(src, dst)
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    rng = np.random.default_rng(1)
    truth = {}
    for name in files:
        tensors = load_file(str(dst / name))
        for key in [k for k in tensors if k.endswith(".weight") and any(f".{x}." in k for x in LINEARS)]:
            w = tensors.pop(key).astype(np.float32)
            out, n = w.shape
            g = n if group == -1 else group
            q, zero, scale = _quantize(w, bits, g, sym, rng)
            base = key[:-len("weight")]
            truth[base] = (q, zero, scale)
            if method == "gptq":
                tensors[base + "qweight"] = _pack(q.T, bits, 0)
                tensors[base + "qzeros"] = _pack((zero - 1).T.astype(np.uint32), bits, 1)  # v1: zero minus one
                tensors[base + "g_idx"] = (np.arange(n) // g).astype(np.int32)
            else:
                tensors[base + "qweight"] = _pack(q.T, 4, 1, AWQ)
                tensors[base + "qzeros"] = _pack(zero.T, 4, 1, AWQ)
            tensors[base + "scales"] = np.ascontiguousarray(scale.T)  # [groups, out]
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                      "desc_act": desc_act, "checkpoint_format": "gptq"} if method == "gptq" else
                                     {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"})
    (dst / "config.json").write_text(json.dumps(config))
    return truth


def _compile(tmp_path, checkpoint, name, **export):
    return compile_artifact(config_from_dict({
        "name": name, "part": "llm", "model": {"checkpoint": str(checkpoint)},
        "export": {"opset": 21, "prefill_len": 64, "max_context": 96, **export},
        "output": {"dir": str(tmp_path)}}))


@pytest.mark.parametrize("method,bits,group,sym,tp", [
    ("gptq", 4, 32, True, 1), ("gptq", 4, 32, False, 2), ("gptq", 8, -1, False, 1), ("gptq", 8, 32, True, 1),
    ("awq", 4, 32, False, 2),
])
def test_imported_integers_are_the_checkpoints(tmp_path, method, bits, group, sym, tp):
    truth = write_quantized(tmp_path / "ck", method, bits, group, sym)
    r = _compile(tmp_path, tmp_path / "ck", f"{method}{bits}", tp=tp)
    assert r.report.passed, r.report.failures
    assert r.report.quantization["reference"] is None and "imported" in r.report.quantization["method"]
    assert "no unquantized original exists" in (r.folder / "parity.md").read_text()
    rank = r.folder / "rank0" if tp > 1 else r.folder
    model = onnx.load(str(rank / "llm_prefill.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q, zero, scale = truth["model.layers.1.mlp.up_proj."]  # column split: rank 0 holds the first outputs
    cols = q.shape[0] // tp
    got_q = inits["stack.layers.1.mlp.up_proj.weight_t.q"]
    got_zp = inits["stack.layers.1.mlp.up_proj.weight_t.zero_point"]
    got_scale = inits["stack.layers.1.mlp.up_proj.weight_t.scale"]
    assert np.array_equal(got_q.astype(np.int64), q[:cols].T.astype(np.int64))
    per_channel = got_zp.ndim == 1  # group_size -1: one zero point and scale per output
    expect_zp, expect_scale = (zero[:cols, 0], scale[:cols, 0]) if per_channel else (zero[:cols].T, scale[:cols].T)
    assert np.array_equal(got_zp.astype(np.int64), expect_zp.astype(np.int64))
    assert np.array_equal(got_scale.astype(np.float16), expect_scale)
    assert got_q.dtype in (np.uint8, ml_dtypes.uint4)


def test_desc_act_is_refused_naming_the_key(tmp_path):
    write_quantized(tmp_path / "ck", "gptq", 4, 32, True, desc_act=True)
    with pytest.raises(CheckpointError) as info:
        checked_plan(config_from_dict({"name": "x", "part": "llm", "model": {"checkpoint": str(tmp_path / "ck")},
                                "export": {"opset": 21}}))
    assert "desc_act" in str(info.value)


def test_requantizing_an_imported_checkpoint_is_refused(tmp_path):
    write_quantized(tmp_path / "ck", "awq", 4, 32, False)
    with pytest.raises(ConfigError) as info:
        checked_plan(config_from_dict({"name": "x", "part": "llm", "model": {"checkpoint": str(tmp_path / "ck")},
                                "export": {"opset": 21, "weights": {"format": "int8"}}}))
    assert info.value.key == "export.weights.format" and "already quantized" in str(info.value)


def test_a_graph_tvm_cannot_build_is_a_failed_check(tmp_path):
    """8-bit GPTQ in groups is written as blocked INT8 DequantizeLinear, which TVM 0.27 does not import: the TVM
    runtime gets one failed check naming the problem (the compile fails, exit 1), ONNX Runtime's checks all pass."""
    from qvlc.errors import ParityError

    write_quantized(tmp_path / "ck", "gptq", 8, 32, True)
    with pytest.raises(ParityError):
        compile_artifact(config_from_dict({
            "name": "g8", "part": "llm", "model": {"checkpoint": str(tmp_path / "ck")},
            "export": {"opset": 21, "prefill_len": 64, "max_context": 96},
            "validate": {"runtimes": ["onnxruntime", "tvm"]}, "output": {"dir": str(tmp_path)}}))
    parity = json.loads((tmp_path / "g8.failed" / "parity.json").read_text())
    assert all(c["passed"] for c in parity["checks"] if c["runtime"] == "onnxruntime")
    (failure,) = parity["failures"]
    assert failure.startswith("[tvm] llm/tvm/build: TVM could not import or build the graph")


@pytest.mark.parametrize("group,opset", [(32, 21), (-1, 19)])
def test_an_opset_left_unset_is_the_lowest_that_expresses_the_checkpoint(tmp_path, group, opset):
    """A grouped GPTQ checkpoint compiles with opset 21 chosen for it (it used to be refused: 'need opset >= 21 …
    this compile asks for 18' when the config never named an opset); only an explicit opset too low is refused."""
    write_quantized(tmp_path / "ck", "gptq", 4 if group > 0 else 8, group, True)
    raw = {"name": "x", "part": "llm", "model": {"checkpoint": str(tmp_path / "ck")}}
    assert checked_plan(config_from_dict(raw)).cfg.export.opset == opset
    with pytest.raises(ConfigError, match="opset"):
        checked_plan(config_from_dict({**raw, "export": {"opset": 18}}))


def test_qwen3_vl_imports_gptq_at_tp2(tmp_path):
    """Qwen3-VL's decoder (no q/k/v biases, q/k norms) from a GPTQ checkpoint: its integers, exact at tp = 2."""
    from qvlc.models import family

    write_quantized(tmp_path / "ck", "gptq", 4, 32, True, family=family("qwen3_vl"))
    r = _compile(tmp_path, tmp_path / "ck", "q3gptq", tp=2)
    assert r.report.passed, r.report.failures
    assert "imported" in r.report.quantization["method"]


def test_imported_awq_with_an_int8_kv_cache(tmp_path):
    """The checkpoint's own AWQ integers and an int8 KV cache (export.kv_cache): exact against the oracle carrying
    both, with the cache's own error reported."""
    write_quantized(tmp_path / "ck", "awq", 4, 32, False)
    r = _compile(tmp_path, tmp_path / "ck", "awq_kv8", kv_cache="int8")
    assert r.report.passed, r.report.failures
    assert "imported" in r.report.quantization["method"]
    assert r.report.kv_cache and all(p["passed"] for p in r.report.kv_cache["prompts"])
