"""A second runtime in the proof: the same cases through Apache TVM Relax built for this CPU, which computes fp16
graphs in fp16 (ONNX Runtime's CPU provider computes fp16 MatMuls in fp32). Tiny checkpoints through the real
loading path; TVM is installed by scripts/setup.sh, so these run in CI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qvlc.compile.stages import compile_artifact
from qvlc.config.loading import config_from_dict
from qvlc.errors import ConfigError, ParityError
from qvlc.precision import Precision, Runtime

BOTH = {"runtimes": ["onnxruntime", "tvm"]}


def _summary(result) -> dict:
    return json.loads((result.folder / "parity.json").read_text())["summary"]


def test_llm_ranks_run_on_tvm_with_their_reductions_summed(compiled):
    """tp = 2, fp16: every prefill and decode check of the rank graphs is made for TVM too, at TVM's tolerance, with
    its own greedy verdict; parity.md gets a runtime column and a tolerance line per runtime."""
    r = compiled("tvm_tp2", validate=BOTH, dtype="fp16", tp=2, prefill_len=128, max_context=160)
    assert r.report.passed, r.report.failures
    s = _summary(r)
    ort, tvm = s["runtimes"]["onnxruntime"], s["runtimes"]["tvm"]
    assert tvm["checks"] > 0 and tvm["failed"] == 0 and set(tvm["worst_per_graph"]) == {"prefill", "decode"}
    assert ort["checks"] - tvm["checks"] == sum(1 for c in r.report.checks if "tp=1" in c.graph)
    outputs = {c.output for c in r.report.checks if c.runtime == "tvm"}
    assert {"rank0.logits", "rank1.present_key_values", "logits"} <= outputs
    assert tvm["tolerance"]["max_rel_l2"] == Precision.FP16.tolerance_on(Runtime.TVM).max_rel_l2
    # TVM computes in fp16: it is further from the oracle than ONNX Runtime, and not by accident equal to it
    assert tvm["worst_per_graph"]["prefill"]["rel_l2"] > 1.5 * ort["worst_per_graph"]["prefill"]["rel_l2"]
    assert {t["runtime"] for t in s["tokens"]} == {"onnxruntime", "tvm"}
    md = (r.folder / "parity.md").read_text()
    assert "Tolerance (fp16, tvm)" in md and "| prefill | text_short | logits | tvm |" in md


def test_fp32_on_tvm_agrees_like_onnx_runtime(compiled):
    r = compiled("tvm_fp32", validate=BOTH, prefill_len=128, max_context=160)
    assert r.report.passed, r.report.failures
    tvm = _summary(r)["runtimes"]["tvm"]
    assert tvm["checks"] > 0 and max(w["rel_l2"] for w in tvm["worst_per_graph"].values()) < 1e-5
    assert all(t.matched == len(t.expected) for t in r.report.tokens if t.runtime == "tvm")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_visual_runs_on_tvm(compiled, family):
    r = compiled(f"tvm_visual_{family}", part="visual", validate=BOTH, checkpoint=f"tiny:{family}", dtype="fp16")
    assert r.report.passed, r.report.failures
    tvm = _summary(r)["runtimes"]["tvm"]
    assert tvm["checks"] == _summary(r)["runtimes"]["onnxruntime"]["checks"] > 0


def test_runtime_cases_limits_the_second_runtime(compiled):
    r = compiled("tvm_one_case", validate={**BOTH, "runtime_cases": 1}, prefill_len=128, max_context=160)
    cases = {c.case.split("/")[0] for c in r.report.checks if c.runtime == "tvm"}
    assert len(cases) == 1 and len({c.case.split("/")[0] for c in r.report.checks}) == 4
    assert any("1 of the 4 prompts" in n for n in r.report.notes)


def test_tvm_sees_the_overflow_onnx_runtime_hides(tmp_path):
    """The planted vision-MLP outlier (~2e5): ONNX Runtime runs that MatMul → Add chain in fp32 and passes; TVM
    computes it in fp16 and gets inf. The compile fails on the range check and on TVM's values, and the first
    divergent layer is found on TVM, at the planted block."""
    from tests.validate.test_ranges import planted

    checkpoint, vision_module, _ = planted("qwen2_vl", tmp_path / "planted")
    cfg = config_from_dict({"name": "v", "part": "visual", "model": {"checkpoint": checkpoint},
                            "export": {"dtype": "fp16"}, "validate": BOTH, "output": {"dir": str(tmp_path)}})
    with pytest.raises(ParityError):
        compile_artifact(cfg)
    def strict(token):  # NaN / Infinity are not JSON: non-finite metrics are written as strings
        raise AssertionError(f"parity.json holds {token}")

    parity = json.loads((tmp_path / "v.failed" / "parity.json").read_text(), parse_constant=strict)
    checks = parity["checks"]
    assert all(c["passed"] for c in checks if c["runtime"] == "onnxruntime")
    bad = [c for c in checks if c["runtime"] == "tvm" and not c["passed"]]
    assert bad and any(not c["metrics"]["finite"] for c in bad if c["metrics"])
    assert any(f.startswith("[tvm] visual/") for f in parity["failures"])
    d = parity["first_divergent_layer"]
    block = vision_module.split(".mlp")[0].removeprefix("model.")
    assert d["runtime"] == "tvm" and d["module"].endswith(block.split("visual.")[1])


def test_qvlc_validate_adds_a_runtime(compiled, capsys):
    from qvlc.compile.stages import validate_artifact

    r = compiled("tvm_later", prefill_len=128, max_context=160)
    assert {c.runtime for c in r.report.checks} == {"onnxruntime"}
    report = validate_artifact(r.folder, runtimes=("tvm",))
    assert report.passed and {c.runtime for c in report.checks} == {"onnxruntime", "tvm"}


@pytest.mark.parametrize("runtimes,fragment", [
    (["tvm"], "onnxruntime is missing"),
    (["onnxruntime", "onnxruntime"], "listed twice"),
    (["onnxruntime", "tensorrt"], "is not one of"),
    ([], "non-empty list"),
])
def test_bad_runtimes_refused(runtimes, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "x", "part": "llm", "validate": {"runtimes": runtimes}})
    assert fragment in str(info.value) and info.value.key == "validate.runtimes"


def test_tvm_not_installed_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tvm" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "x", "part": "llm", "validate": BOTH})
    assert 'pip install "qvlc[tvm]"' in info.value.fix


def test_the_schedule_changes_speed_not_arithmetic(tmp_path):
    """The reduction schedule reorders loops but keeps each output's summation order: fp16 results are bitwise
    those of the unscheduled build, on a MatMul and on a last-axis reduction."""
    from qvlc.runtime.tvm_session import TvmSession

    k = 300  # not a multiple of 16: the split leaves a remainder
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"]), helper.make_node("ReduceSum", ["c", "axes"], ["d"],
                                                                         keepdims=0)],
        "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [5, k]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT16, [k, 37])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT16, [5, 37]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT16, [5])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((5, k)).astype(np.float16), "b": rng.standard_normal((k, 37)).astype(np.float16)}
    fast, plain = TvmSession(path).run(None, feeds), TvmSession(path, schedule=False).run(None, feeds)
    for x, y in zip(fast, plain):
        assert x.dtype == np.float16 and np.array_equal(x, y)
    exact = feeds["a"].astype(np.float64) @ feeds["b"].astype(np.float64)
    # fp16 running sums: visibly off the exact product, unlike ONNX Runtime's fp32 accumulation
    assert 1e-4 < np.abs(fast[0] - exact).max() / np.abs(exact).max() < 5e-2


def test_tvm_holding_7b_ranks_is_refused_before_loading(monkeypatch):
    """TVM's sessions hold every rank's weights in memory (ONNX Runtime maps them): the 7B tp = 4 LLM fits a 16 GiB
    runner on ONNX Runtime alone and is refused, naming validate.runtimes, with tvm; its visual part fits either way."""
    from qvlc.checkpoint.tiny import shipped_config
    from qvlc.compile.memory_estimate import check_memory
    from qvlc.config.loading import load_config
    from qvlc.models import family as family_of

    monkeypatch.setenv("QVLC_MEMORY_LIMIT_GB", "16")
    fam = family_of("qwen2_vl")
    dims = fam.dims(shipped_config("qwen2_vl_7b", fam))
    for part in ("llm", "visual"):
        raw = load_config(Path(__file__).parents[2] / "configs" / f"qwen2_vl_7b_{part}.yaml").to_dict()
        check_memory(config_from_dict(raw), dims)
        raw["validate"]["runtimes"] = ["onnxruntime", "tvm"]
        if part == "visual":
            check_memory(config_from_dict(raw), dims)
            continue
        with pytest.raises(ConfigError) as info:
            check_memory(config_from_dict(raw), dims)
        assert info.value.key == "validate.runtimes" and "TVM sessions" in str(info.value)
