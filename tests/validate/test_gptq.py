"""Calibrated GPTQ (export.weights.method: gptq) on the tiny checkpoint through the real loading path: it beats round
to nearest on the same layer, the graphs carry exactly the integers the calibration stored (every rank's slice),
both proofs pass, and ``qvlc validate`` proves the graphs against the stored integers, not a recalibration."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qvlc.checkpoint.hf_model import load_checkpoint
from qvlc.compile.plan import checked_plan
from qvlc.compile.stages import validate_artifact
from qvlc.config.loading import config_from_dict
from qvlc.export.calibration_data import calibration_set
from qvlc.weights.gptq import STORE, gptq_quantize, read_store
from qvlc.weights.quant import quantize_rtn

LEN = {"prefill_len": 64, "max_context": 96}
CAL = {"nsamples": 8, "seqlen": 64}
INT4 = {"format": "int4", "group_size": 32, "symmetric": False, "method": "gptq", "calibration": CAL,
        "include": ["llm", "lm_head"]}


def _int4(compiled):
    return compiled("gptq_int4", opset=21, tp=2, weights=INT4, **LEN)


def test_gptq_output_error_is_below_round_to_nearest_on_the_same_layer(compiled):
    """Layer 0's q_proj and gate_proj, on the calibration windows' own inputs (recomputed here with the transformers
    model loaded from the checkpoint): GPTQ's integers (read from the artifact's store) give a smaller output error
    than round to nearest's with the same scale rules; and the record says so for every Linear."""
    r = _int4(compiled)
    cfg = config_from_dict({"name": "g", "part": "llm", "model": {"checkpoint": "tiny"},
                            "export": {"opset": 21, **LEN, "weights": INT4}})
    plan = checked_plan(cfg)
    windows = calibration_set(cfg, plan.checkpoint, plan.dims.text.vocab).windows
    model = load_checkpoint(plan.checkpoint, plan.family, plan.dims).model
    layer = model.model.language_model.layers[0]
    seen = {}

    def keep(name):
        def hook(module, args):
            seen.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [getattr(getattr(layer, a), b).register_forward_pre_hook(keep(f"{a}.{b}"))
             for a, b in (("self_attn", "q_proj"), ("mlp", "gate_proj"))]
    with torch.no_grad():
        model.model.language_model(input_ids=torch.from_numpy(windows))
    for h in hooks:
        h.remove()
    for name, x in seen.items():
        w = getattr(getattr(layer, name.split(".")[0]), name.split(".")[1]).weight.detach().numpy()
        key = next(k for k in json.loads((r.folder / "calibration" / "calibration.json").read_text())["weights"]
                   if k["weight"].endswith(f"layers.0.{name}.weight"))["weight"]
        gptq = read_store(r.folder / STORE, key).dequantize(np.float32)
        rtn = quantize_rtn(w, 4, 32, False, np.float32).dequantize(np.float32)
        x = x.numpy()
        err = {k: np.linalg.norm(x @ (q - w).T) / np.linalg.norm(x @ w.T) for k, q in (("gptq", gptq), ("rtn", rtn))}
        assert err["gptq"] < 0.9 * err["rtn"], (name, err)
    record = json.loads((r.folder / "calibration" / "calibration.json").read_text())
    assert all(w["gptq_error"] < w["rtn_error"] for w in record["weights"])
    assert len(record["weights"]) == 2 * 7 + 1 and record["nsamples"] == 8 and record["seqlen"] == 64


def test_gptq_on_a_layer_against_round_to_nearest_directly():
    """The algorithm alone, on inputs with correlated and outlier channels (what GPTQ exploits): int8 per channel and
    int4 groups, symmetric and not, all below round to nearest's output error."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 128)).astype(np.float32) @ (np.eye(128) + 0.3 * rng.standard_normal((128, 128)))
    x[:, :4] *= 8
    w = (0.05 * rng.standard_normal((64, 128))).astype(np.float32)
    h = torch.from_numpy((2 * x.T @ x / len(x)).astype(np.float32))
    for bits, group, symmetric in ((8, None, True), (8, None, False), (4, 32, True), (4, 64, False)):
        errs = [np.linalg.norm(x @ (q.dequantize(np.float32) - w).T) for q in
                (gptq_quantize(w, h, bits, group, symmetric), quantize_rtn(w, bits, group, symmetric))]
        assert errs[0] < 0.8 * errs[1], (bits, group, symmetric, errs)


def test_graphs_carry_the_stored_integers_and_both_proofs_pass(compiled):
    """int4 groups of 32 with zero points at tp = 2, lm_head included: exact against the model carrying the stored
    integers (greedy tokens equal, fp32), the quantization error reported with the calibration; each rank's INT4/UINT4
    initializers are its slice of the store's integers."""
    r = _int4(compiled)
    assert r.report.passed, r.report.failures
    assert all(t.passed and t.required for t in r.report.tokens)
    q = json.loads((r.folder / "parity.json").read_text())["quantization_error"]
    assert q["method"] == "gptq" and q["calibration"]["source"] == "the built-in set"
    assert q["calibration"]["gptq_over_rtn"]["worst"] < 1.0
    assert "Calibrated by GPTQ on 8 windows of 64 tokens" in (r.folder / "parity.md").read_text()
    record = json.loads((r.folder / "calibration" / "calibration.json").read_text())
    name = next(w["weight"] for w in record["weights"] if w["weight"].endswith("layers.1.mlp.down_proj.weight"))
    whole = read_store(r.folder / STORE, name)
    half = whole.q.shape[1] // 2
    for rank in (0, 1):
        model = onnx.load(str(r.folder / f"rank{rank}" / "llm_prefill.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        got = numpy_helper.to_array(inits["stack.layers.1.mlp.down_proj.weight_t.q"])  # [in of the rank, out]
        assert np.array_equal(got.T, whole.q[:, rank * half:(rank + 1) * half])
        zp = numpy_helper.to_array(inits["stack.layers.1.mlp.down_proj.weight_t.zero_point"])  # [groups, out]
        assert np.array_equal(zp.T, whole.zero_point[:, rank * half // 32:(rank + 1) * half // 32])


def test_qwen2_5_vl_calibrates_too(compiled):
    """The calibration runs the family's own decoder layers: Qwen2.5-VL's, int8 in fp16, exact and below round to
    nearest on every Linear."""
    r = compiled("gptq_q25", checkpoint="tiny:qwen2_5_vl", dtype="fp16", opset=21, **LEN,
                 weights={"format": "int8", "method": "gptq", "calibration": CAL})
    assert r.report.passed, r.report.failures
    record = json.loads((r.folder / "calibration" / "calibration.json").read_text())
    assert all(w["gptq_error"] < w["rtn_error"] for w in record["weights"])


def test_validate_proves_against_the_stored_integers(compiled, copy_artifact, reseal):
    """``qvlc validate`` reads the artifact's store: it passes as compiled, and an integer changed in the store (the
    manifest resealed, so only the values can tell) makes the graphs disagree with the model carrying the store."""
    r = _int4(compiled)
    assert validate_artifact(r.folder).passed
    folder = copy_artifact(r.folder)
    header_len = int.from_bytes((folder / STORE).read_bytes()[:8], "little")
    header = json.loads((folder / STORE).read_bytes()[8:8 + header_len])
    key = next(k for k in header if k.endswith("layers.0.mlp.up_proj.weight.scale"))
    a, b = header[key]["data_offsets"]
    data = bytearray((folder / STORE).read_bytes())
    base = 8 + header_len
    scales = np.frombuffer(bytes(data[base + a:base + b]), np.float32) * 2
    data[base + a:base + b] = scales.astype(np.float32).tobytes()
    (folder / STORE).write_bytes(bytes(data))
    reseal(folder)
    report = validate_artifact(folder)
    assert not report.passed and any(f.startswith(("prefill/", "decode/")) for f in report.failures)


def test_calibration_set_reads_texts_and_ids_and_is_deterministic(tmp_path):
    """A JSONL mixing texts (tokenized with the checkpoint's tokenizer) and input_ids; the same file gives the same
    windows; a JSON array works too."""
    from transformers import AutoTokenizer

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "The cat sat on the mat. " * 8}) + "\n" +
                    json.dumps({"input_ids": list(range(100, 140))}) + "\n" + json.dumps("a plain string") + "\n")
    cfg = config_from_dict({"name": "g", "part": "llm", "model": {"checkpoint": "tiny"}, "export": {
        "opset": 21, **LEN, "weights": {"format": "int8", "method": "gptq",
                                        "calibration": {"path": str(path), "nsamples": 5, "seqlen": 16}}}})
    plan = checked_plan(cfg)
    a = calibration_set(cfg, plan.checkpoint, plan.dims.text.vocab)
    tok = AutoTokenizer.from_pretrained(str(plan.checkpoint))
    n_text = len(tok("The cat sat on the mat. " * 8)["input_ids"])
    assert a.set_tokens == n_text + 40 + len(tok("a plain string")["input_ids"]) and a.windows.shape == (5, 16)
    assert np.array_equal(a.windows, calibration_set(cfg, plan.checkpoint, plan.dims.text.vocab).windows)
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps([{"input_ids": list(range(100, 140))}]))
    cfg2 = config_from_dict({**cfg.to_dict(), "export": {**cfg.to_dict()["export"], "weights": {
        **cfg.to_dict()["export"]["weights"], "calibration": {"path": str(as_json), "nsamples": 2, "seqlen": 16}}}})
    b = calibration_set(cfg2, plan.checkpoint, plan.dims.text.vocab)
    assert b.set_tokens == 40 and all(np.array_equal(w, np.arange(w[0], w[0] + 16)) for w in b.windows)


def test_cli_shows_the_calibrate_stage_and_both_proofs(tmp_path):
    """`qvlc compile` on a gptq config: the calibrate stage, the exactness rows and the quantization-error rows."""
    import yaml
    from typer.testing import CliRunner

    from qvlc.cli.app import app

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "part": "llm", "model": {"checkpoint": "tiny"},
                                    "export": {"opset": 21, **LEN, "weights": {"format": "int8", "method": "gptq",
                                                                               "calibration": {"nsamples": 2,
                                                                                               "seqlen": 32}}},
                                    "output": {"dir": str(tmp_path / "out")}}))
    res = CliRunner().invoke(app, ["compile", str(path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "calibrate" in res.output and "logits vs unquantized (≥ 0.98)" in res.output
