"""export.kv_cache: int8 — the rule against an independent NumPy implementation, the graphs' contract, the proof
(the oracle applies the rule in transformers' cache update; the cache's own error against an unquantized cache), the
rule's effect on tokens, its combinations with the other options, and what the configs accept and refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qvlc.artifact.layout import CHUNK, DECODE, PREFILL
from qvlc.artifact.trust import verify
from qvlc.config.loading import config_from_dict
from qvlc.config.vamc import from_vamc
from qvlc.errors import ConfigError, ParityError
from qvlc.models.common import kvquant
from qvlc.models.common.kvquant import quantize_kv

S, C, T = 64, 128, 16
L, KVH, D, H, V = 2, 2, 16, 64, 1024


def numpy_rule(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The issue's rule, written again: amax over D (at least 1e-6), scale = amax / 127 in fp32, round half to
    even, clip to ±127."""
    x = x.astype(np.float32)
    scale = (np.maximum(np.abs(x).max(axis=-1), np.float32(1e-6)) / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def test_the_rule_matches_an_independent_implementation_ties_and_zero_rows_included():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 7, D)) * rng.uniform(1e-3, 30, (3, 4, 7, 1))).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero row: scale 1e-6 / 127, integers 0
    x[0, 0, 1] = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5] + [0] * (D - 6), np.float32)  # scale 1: exact ties
    for dtype in (torch.float32, torch.float16):
        xt = torch.from_numpy(x).to(dtype)
        q, scale = quantize_kv(xt)
        want_q, want_scale = numpy_rule(xt.float().numpy())
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        assert np.array_equal(q.numpy(), want_q) and np.array_equal(scale.numpy(), want_scale)
    q, _ = quantize_kv(torch.from_numpy(x))
    assert q[0, 0, 1, :6].tolist() == [127, 0, 2, 2, 0, -2]  # half to even, both signs
    assert not q[0, 0, 0].any() and int(q.abs().max()) == 127


@pytest.fixture(scope="module")
def int8(compiled):
    """fp32, int8 cache, with a chunk graph: every graph carries the int8 cache."""
    return compiled("llm_kv8_fp32", prefill_len=S, max_context=C, prefill_chunk=T, kv_cache="int8")


def test_parity_with_the_rule_in_transformers_cache_update(int8):
    r = int8.report
    assert r.passed, r.failures
    graphs = {c.graph for c in r.checks}
    assert {"prefill", "decode", "chunk", "decode after chunk"} <= graphs
    assert all(t.passed and t.matched == len(t.expected) for t in r.tokens)  # fp32: every greedy token
    kv = [c for c in r.checks if c.output == "present_key_values"]
    assert kv and max(c.metrics["max_abs"] for c in kv) < 1e-4


def test_the_int8_signature_in_the_contract_and_manifest(int8):
    m = json.loads((int8.folder / "manifest.json").read_text())
    assert m["llm"]["kv_cache"] == "int8" and m["config"]["export"]["kv_cache"] == "int8"
    g = {x["file"]: x for x in m["graphs"]}
    io = lambda rows: [(r["name"], r["shape"], r["dtype"]) for r in rows]  # noqa: E731
    assert io(g[PREFILL]["outputs"]) == [("logits", [1, 1, V], "float32"),
                                         ("present_key_values", [L, 2, 1, KVH, S, D], "int8"),
                                         ("present_kv_scales", [L, 2, 1, KVH, S], "float32")]
    for graph, t in ((DECODE, 1), (CHUNK, T)):
        assert io(g[graph]["inputs"])[4:] == [("past_key_values", [L, 2, 1, KVH, C - 1, D], "int8"),
                                              ("past_kv_scales", [L, 2, 1, KVH, C - 1], "float32")]
        assert io(g[graph]["outputs"])[1:] == [("present_key_values", [L, 2, 1, KVH, t, D], "int8"),
                                               ("present_kv_scales", [L, 2, 1, KVH, t], "float32")]
    assert verify(int8.folder).problems == []


def test_the_cache_error_section_and_the_rule_changes_tokens(int8, compiled):
    """The report carries the cache's own error per prompt; on the tiny model the rule changes greedy tokens (its
    logits have near-ties), so an implementation that ignored it would fail the fp32 token checks."""
    kv = int8.report.kv_cache
    prompts = {p["case"]: p for p in kv["prompts"]}
    assert set(prompts) == set(int8.report.cases["run"])
    assert all(p["passed"] and 0.999 < p["worst_cosine"] < 1.0 and p["worst_rel_l2"] > 1e-4 for p in prompts.values())
    assert any(p["tokens_matched"] < p["of"] for p in prompts.values())
    fp = compiled("llm_chunk_fp32", prefill_len=S, max_context=C, prefill_chunk=T)  # test_chunk's artifact
    tokens = lambda r: {t.case: t.got for t in r.tokens if t.graph == "prefill+decode"}  # noqa: E731
    assert tokens(fp.report) != tokens(int8.report)
    md = (int8.folder / "parity.md").read_text()
    assert "## KV cache error" in md and "greedy tokens equal" in md


def test_attention_that_skips_the_rule_for_its_own_call_fails(compiled, monkeypatch):
    """The rule also governs the positions a call writes: a graph whose attention reads its own new K/V unquantized
    (while storing them as int8) is caught by parity."""
    real = kvquant.KvStore.pack

    def unquantized_in_the_call(self, x):
        parts, _ = real(self, x)
        return parts, x

    monkeypatch.setattr(kvquant.KvStore, "pack", unquantized_in_the_call)
    with pytest.raises(ParityError) as e:
        compiled("llm_kv8_skips_rule", prefill_len=S, max_context=C, kv_cache="int8")
    assert "prefill/text_short/logits" in str(e.value) and "decode/text_short/step0/logits" in str(e.value)


OPTIONS = {
    "fp16_tp2_int8weights_chunk": dict(dtype="fp16", tp=2, weights={"format": "int8"}, prefill_chunk=T),
    "qwen3_vl_fp16_islands_tvm": dict(dtype="fp16", fp32_layers=["model.language_model.layers.1.self_attn"],
                                      checkpoint="tiny:qwen3_vl",
                                      validate={"runtimes": ["onnxruntime", "tvm"], "runtime_cases": 1}),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_with_the_other_options(compiled, name):
    export = dict(OPTIONS[name])
    checkpoint, validate = export.pop("checkpoint", "tiny"), export.pop("validate", None)
    r = compiled(f"llm_kv8_{name}", checkpoint=checkpoint, validate=validate, prefill_len=S, max_context=C,
                 kv_cache="int8", **export).report
    assert r.passed, r.failures
    if validate:
        assert {("tvm", "prefill"), ("tvm", "decode")} <= {(c.runtime, c.graph) for c in r.checks}
    assert r.kv_cache and all(p["passed"] for p in r.kv_cache["prompts"])
    if export.get("tp") == 2:
        assert {"rank0.present_key_values", "rank1.present_key_values"} <= {c.output for c in r.checks}
        assert r.quantization and all(x["passed"] for x in r.quantization["checks"])


def test_rounding_flips_are_one_step_and_rare_or_a_failure():
    from qvlc.precision import Precision
    from qvlc.validate.kv_error import add_kv
    from qvlc.validate.metrics import ParityReport

    rng = np.random.default_rng(1)
    q, scale = numpy_rule(rng.standard_normal((L, 2, KVH, 40, D)).astype(np.float32))
    ref = q.astype(np.float32) * scale[..., None]
    flipped = ref.copy()
    flipped[0, 0, 0, 0, 3] += scale[0, 0, 0, 0]  # one element one step up: a midpoint the two sides straddled
    truncated = np.trunc(ref / scale[..., None] * 0.99) * scale[..., None]  # many elements off by a step
    report = ParityReport("llm", Precision.FP32)
    add_kv(report, "prefill", "x", "present_key_values", ref, flipped, "int8")
    add_kv(report, "prefill", "x", "present_key_values", ref, truncated, "int8")
    add_kv(report, "prefill", "x", "present_key_values", ref, flipped, "fp")
    one, many, fp = report.checks
    assert one.passed and one.metrics["rounding_flips"] == 1
    assert not many.passed and not fp.passed


def test_configs_accept_kv_cache_and_vamc_w16kv8_and_refuse_what_does_not_fit():
    cfg = config_from_dict({"name": "kv", "part": "llm", "export": {"kv_cache": "int8"}})
    assert cfg.export.kv_cache == "int8"
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "kv", "part": "llm", "export": {"kv_cache": "int4"}})
    assert e.value.key == "export.kv_cache"
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "kv", "part": "visual", "export": {"kv_cache": "int8"}})
    assert e.value.key == "export.kv_cache" and "no KV cache" in str(e.value)
    vamc = {"frontend": {"checkpoint": "tiny", "quantize": {"type": "w16kv8"}}, "backend": {"dtype": "float16"}}
    native = from_vamc(vamc)
    assert native["export"]["dtype"] == "fp16" and native["export"]["kv_cache"] == "int8"
    assert "weights" not in native["export"]
    with pytest.raises(ConfigError) as e:
        from_vamc({**vamc, "backend": {"dtype": "int8"}})
    assert e.value.key == "backend.dtype" and "w16kv8" in str(e.value)


def test_fp16_with_an_int8_cache_has_its_own_tolerance_and_fp32_keeps_its_own():
    """fp16 requantization (the graph's fp16 K/V landing one integer away from the fp32 oracle's) gets its measured
    row; fp32, the rule's exactness proof, and TVM's fp16 row are unchanged."""
    from qvlc.precision import Precision, Runtime
    from qvlc.validate.metrics import ParityReport

    fp16 = Precision.FP16.tolerance_on(Runtime.ONNXRUNTIME, "int8")
    assert fp16.max_rel_l2 == 6e-2 and fp16.min_cosine == 0.998
    assert Precision.FP16.tolerance_on(Runtime.ONNXRUNTIME) == Precision.FP16.tolerance
    assert Precision.FP32.tolerance_on(Runtime.ONNXRUNTIME, "int8") == Precision.FP32.tolerance
    assert Precision.FP16.tolerance_on(Runtime.TVM, "int8") == Precision.FP16.tolerance_on(Runtime.TVM)
    report = ParityReport("llm", Precision.FP16, cache="int8")
    assert report.tolerance == fp16 and "rel_l2 <= 0.06" in report.to_markdown()
