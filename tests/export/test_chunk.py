"""export.prefill_chunk: the chunk graph beside prefill and decode — its contract, shared weights, the proof (chunk
cases, greedy tokens against the full prefill path and transformers), the host loop, and what the config refuses."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qvlc.artifact.layout import CHUNK, PREFILL
from qvlc.artifact.trust import verify
from qvlc.config.loading import config_from_dict
from qvlc.errors import ConfigError
from qvlc.runtime.llm import LlmRuntime
from qvlc.validate.llm_cases import build_cases

S, C, T = 64, 128, 16
CHUNK_CASES = ("chunk_short", "chunks_exact", "image_across_chunks")


@pytest.fixture(scope="module")
def chunked(compiled):
    return compiled("llm_chunk_fp32", prefill_len=S, max_context=C, prefill_chunk=T)


@pytest.fixture(scope="module")
def full(compiled):
    return compiled("llm_fp32", prefill_len=S, max_context=C)  # the same artifact test_llm_compile builds


def test_parity_covers_the_chunk_graph(chunked):
    r = chunked.report
    assert r.passed, r.failures
    assert r.cases["run"][-3:] == list(CHUNK_CASES)
    graphs = {(c.graph, c.case.split("/")[0]) for c in r.checks}
    for case in ("text_short", "two_images_full", *CHUNK_CASES):  # every prompt through both paths
        assert {("prefill", case), ("chunk", case), ("decode after chunk", case)} <= graphs
    tokens = {(t.graph, t.case): t for t in r.tokens}
    for case in r.cases["run"]:
        assert tokens[("chunk+decode", case)].passed and tokens[("chunk vs prefill", case)].passed
        assert tokens[("chunk+decode", case)].matched == 16
    assert max(c.metrics["max_abs"] for c in r.checks if c.graph == "chunk") < 1e-4


def test_chunk_signature_in_the_contract_and_manifest(chunked):
    m = json.loads((chunked.folder / "manifest.json").read_text())
    assert m["llm"]["prefill_chunk"] == T and m["config"]["export"]["prefill_chunk"] == T
    g = {x["file"]: x for x in m["graphs"]}[CHUNK]
    L, kvh, D, H = 2, 2, 16, 64
    io = lambda rows: [(r["name"], r["shape"], r["dtype"]) for r in rows]  # noqa: E731
    assert io(g["inputs"]) == [("inputs_embeds", [1, T, H], "float32"), ("attention_mask", [1, C - 1 + T], "int64"),
                               ("cos", [1, 1, T, D], "float32"), ("sin", [1, 1, T, D], "float32"),
                               ("past_key_values", [L, 2, 1, kvh, C - 1, D], "float32")]
    assert io(g["outputs"]) == [("logits", [1, 1, 1024], "float32"),
                                ("present_key_values", [L, 2, 1, kvh, T, D], "float32")]
    assert verify(chunked.folder).problems == []


def test_chunk_graph_adds_no_weight_bytes(chunked, full):
    """The same weights file, byte for byte: the chunk graph reads the tensors prefill and decode read."""
    a, b = chunked.folder / "llm_weights.data", full.folder / "llm_weights.data"
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    model = onnx.load(str(chunked.folder / CHUNK), load_external_data=False)
    ext = {kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
           for kv in t.external_data if kv.key == "location"}
    assert ext == {"llm_weights.data"}
    assert chunked.export.weights_unshared_bytes >= 2.9 * a.stat().st_size * 0.99  # three graphs, one copy


def test_chunk_cases_sit_on_the_edges(chunked):
    from qvlc.checkpoint.tiny import tiny_checkpoint
    from qvlc.models import family

    fam = family("qwen2_vl")
    dims = fam.dims(json.loads((tiny_checkpoint() / "config.json").read_text()))
    cases = {c.name: c for c in build_cases(dims, S, 0, 0.02, prefill_chunk=T)}
    assert len(cases["chunk_short"].ids) < T and len(cases["chunks_exact"].ids) == 2 * T
    ids = cases["image_across_chunks"].ids
    pad = -(-len(ids) // T) * T - len(ids)
    chunk_of = (np.flatnonzero(ids == dims.tokens.image) + pad) // T
    assert len(ids) > 2 * T and set(chunk_of) == {0, 1}  # the image's rows in the first and the second chunk
    plain = {c.name: c.ids for c in build_cases(dims, S, 0, 0.02)}
    assert all(np.array_equal(plain[n], cases[n].ids) for n in plain)  # the other cases do not move


def test_runtime_fills_the_cache_chunk_by_chunk(chunked, full):
    """The host loop: ceil(n / T) chunk calls, the first left-padded; the logits and the greedy tokens are the
    full prefill's, and decode then continues from slot ceil(n / T) * T."""
    rng = np.random.default_rng(3)
    rt, ref = LlmRuntime(chunked.folder), LlmRuntime(full.folder)
    assert rt.chunked and not ref.chunked
    calls = []
    graph = rt.chunk_graph
    run = graph.run
    graph.run = lambda feeds: calls.append(feeds[0]["inputs_embeds"].shape) or run(feeds)
    for n in (5, T, 2 * T + 3, S):
        ids = rng.integers(0, 1000, size=n)
        w, w_ref = rt.prompt_window(ids), ref.prompt_window(ids)
        calls.clear()
        got, want = rt.logits_of(rt.prefill_window(w)), ref.logits_of(ref.prefill_window(w_ref))
        assert len(calls) == -(-n // T) and rt.state.window == rt.state.slot == -(-n // T) * T
        assert PREFILL not in rt._graphs  # the full prefill graph is never opened
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert rt.greedy(got, w.delta, 6) == ref.greedy(want, w_ref.delta, 6)


def test_config_refuses_a_chunk_that_does_not_tile_s():
    base = {"name": "x", "part": "llm", "export": {"prefill_len": S, "max_context": C}}
    for bad in (24, S, 40, -16):
        with pytest.raises(ConfigError) as e:
            config_from_dict({**base, "export": {**base["export"], "prefill_chunk": bad}})
        assert e.value.key == "export.prefill_chunk" and "16, 32" in e.value.fix
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "x", "part": "visual", "export": {"prefill_chunk": 16}})
    assert e.value.key == "export.prefill_chunk"
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, "validate": {"cases": ["chunk_short"]}})
    assert "prefill_chunk" in e.value.fix


def test_qwen3_fp16_tp2_chunks_with_deepstack(compiled):
    """DeepStack rows per chunk, interleaved M-RoPE, two ranks with their AllReduce points, fp16."""
    r = compiled("llm_chunk_qwen3_fp16_tp2", checkpoint="tiny:qwen3_vl", prefill_len=S, max_context=C,
                 prefill_chunk=T, dtype="fp16", tp=2, validate={"cases": ["one_image_half", *CHUNK_CASES]})
    assert r.report.passed, r.report.failures
    m = json.loads((r.folder / "manifest.json").read_text())
    chunk = {x["file"]: x for x in m["graphs"]}["rank1/" + CHUNK]
    assert ("deepstack_embeds", [2, 1, T, 64]) in [(i["name"], i["shape"]) for i in chunk["inputs"]]
    assert all(f"rank{k}/{CHUNK}" in rec["files"] for k, rec in enumerate(m["tp"]["per_rank"]))
    agree = [t.matched for t in r.report.tokens if t.graph == "chunk vs prefill"]
    assert len(agree) == 4 and min(agree) >= 8


def test_a_fault_in_the_chunk_graph_alone_is_found_and_located(chunked, copy_artifact, reseal):
    """Layer 1's down_proj of llm_chunk.onnx (only) pointed at a scaled copy of the weight: prefill and decode still
    pass, the chunk checks fail, and the diagnosis runs the last chunk and names layer 1."""
    from qvlc.compile.stages import validate_artifact

    folder = copy_artifact(chunked.folder)
    model = onnx.load(str(folder / CHUNK), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == "stack.layers.1.mlp.down_proj.weight_t")
    ext = {e.key: e for e in init.external_data}
    weights = folder / ext["location"].value
    data = weights.read_bytes()
    offset, length = int(ext["offset"].value), int(ext["length"].value)
    scaled = (np.frombuffer(data[offset:offset + length], np.float32) * 1.5).astype(np.float32).tobytes()
    pad = b"\0" * (-len(data) % 64)
    weights.write_bytes(data + pad + scaled)
    ext["offset"].value = str(len(data) + len(pad))
    onnx.save(model, str(folder / CHUNK))
    reseal(folder)
    report = validate_artifact(folder)
    failed = {c.graph for c in report.checks if not c.passed}
    assert failed and failed <= {"chunk", "decode after chunk"}, failed
    assert report.divergence["module"] == "model.language_model.layers.1", report.divergence
    assert "(last chunk)" in report.divergence["case"]
