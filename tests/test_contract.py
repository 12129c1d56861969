"""The artifact contract: manifest.json written and read back typed in one place, damaged manifests refused with
the field named, and graph interfaces checked names → shapes → dtypes for the LLM graphs as for the visual one."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest

from qvlc.artifact.layout import DECODE, PREFILL
from qvlc.artifact.manifest import Manifest, read_manifest
from qvlc.artifact.signature import GraphSig, TensorSig
from qvlc.compile.plan import Plan
from qvlc.errors import QvlcError
from qvlc.precision import Precision
from qvlc.validate.llm import check_interfaces
from qvlc.validate.metrics import ParityReport


@pytest.fixture(scope="module")
def llm(compiled):
    return compiled("contract_llm", prefill_len=64, max_context=96, validate={"enabled": False})


def test_manifest_reads_back_typed_and_writes_the_same(llm):
    m = read_manifest(llm.folder)
    assert m.to_dict() == json.loads((llm.folder / "manifest.json").read_text())
    assert m.family == "qwen2_vl" and m.llm.dtype is Precision.FP32 and m.llm.prefill_len == 64
    assert m.graph(PREFILL).outputs[0] == TensorSig("logits", (1, 1, 1024), "float32")
    assert {f.path for f in m.files} >= {PREFILL, DECODE, "embed_tokens.bin", "llm_weights.data"}


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "not valid JSON"),
    ("[]", "expected an object"),
    ("{}", "has no field 'qvlc_version'"),
])
def test_damaged_manifest_is_refused_naming_the_problem(llm, copy_artifact, text, fragment):
    folder = copy_artifact(llm.folder)
    (folder / "manifest.json").write_text(text)
    with pytest.raises(QvlcError) as info:
        read_manifest(folder)
    assert fragment in str(info.value) and "recompile" in info.value.fix


@pytest.mark.parametrize("field,value,fragment", [
    (("llm", "prefill_len"), "128", "llm.prefill_len: expected a int"),
    (("llm", "dtype"), "bf16", "one of ['fp32', 'fp16']"),
    (("llm", "mrope_section"), 3, "expected a list"),
    (("files",), [{"path": "x", "bytes": 1}], "files[0] has no field 'sha256'"),
])
def test_mistyped_fields_are_named(llm, field, value, fragment):
    data = json.loads((llm.folder / "manifest.json").read_text())
    node = data
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    with pytest.raises(QvlcError) as info:
        Manifest.from_dict(data)
    assert fragment in str(info.value)


def test_signature_mismatches_go_names_shapes_dtypes():
    sig = GraphSig((TensorSig("a", (1, 2), "float32"),), (TensorSig("y", (3,), "float16"),))
    got = sig.mismatches((TensorSig("a", (1, 4), "float32"), TensorSig("b", (1,), "int64")), ())
    assert ("y", "missing output (graph has [])") in got
    assert ("b", "unexpected input (contract: ['a'])") in got
    assert ("a", "float32 [1, 4] != contract float32 [1, 2]") in got
    assert sig.mismatches(sig.inputs, sig.outputs) == []


def _plan(llm) -> Plan:
    from qvlc.compile.plan import checked_plan
    from qvlc.config.loading import config_from_dict

    return checked_plan(config_from_dict(read_manifest(llm.folder).config))


def test_llm_graph_missing_an_output_is_reported_not_raised(llm, copy_artifact):
    folder = copy_artifact(llm.folder)
    model = onnx.load(str(folder / DECODE), load_external_data=False)
    kept = [o for o in model.graph.output if o.name != "present_key_values"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(folder / DECODE))
    report = ParityReport("llm", Precision.FP32)
    assert not check_interfaces(_plan(llm), folder, report)
    problems = {(c.graph, c.output): c.problem for c in report.checks if not c.passed}
    assert problems == {("decode", "present_key_values"): "missing output (graph has ['logits'])"}


def test_llm_interface_against_another_shape(llm):
    plan = _plan(llm)
    wrong = dataclasses.replace(plan, cfg=dataclasses.replace(
        plan.cfg, export=dataclasses.replace(plan.cfg.export, prefill_len=80, max_context=112)))
    report = ParityReport("llm", Precision.FP32)
    assert not check_interfaces(wrong, llm.folder, report)
    failed = {(c.graph, c.output) for c in report.checks if not c.passed}
    assert ("prefill", "inputs_embeds") in failed and ("decode", "past_key_values") in failed
    assert ("prefill", "logits") not in failed


def test_manifest_records_the_opset_the_graphs_have(compiled):
    r = compiled("contract_opset21", prefill_len=64, max_context=96, opset=21, validate={"enabled": False})
    m = read_manifest(r.folder)
    assert m.config["export"]["opset"] == 21 and {g.opset for g in m.graphs} == {21}
