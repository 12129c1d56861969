"""Tensor-parallel LLM ranks: per-rank graphs, explicit AllReduce, proof by recombination, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from qvlc.compile.plan import checked_plan
from qvlc.compile.stages import compile_artifact, validate_artifact
from qvlc.config.loading import config_from_dict
from qvlc.errors import ConfigError, ParityError
from qvlc.export.onnx_export import check_graph
from qvlc.parallel.allreduce import DOMAIN, OP_TYPE
from qvlc.runtime.llm import LlmRuntime

S, C = 64, 128
L = 2  # tiny: 2 layers, 4 heads, 2 kv heads, intermediate 128, vocab 1024


@pytest.fixture(scope="module")
def tp1(compiled):
    return compiled("llm_fp32", prefill_len=S, max_context=C)


@pytest.fixture(scope="module")
def tp2(compiled):
    return compiled("llm_tp2", prefill_len=S, max_context=C, tp=2)


@pytest.fixture(scope="module")
def tp4(compiled):  # 2 kv heads over 4 ranks: each kv head replicated on two ranks
    return compiled("llm_tp4", prefill_len=S, max_context=C, tp=4)


@pytest.mark.parametrize("which", ["tp2", "tp4"])
def test_ranks_pass_parity_per_rank_and_recombined(which, request):
    r = request.getfixturevalue(which).report
    assert r.passed, r.failures
    tp = int(which[2:])
    outputs = {c.output for c in r.checks if c.graph == "prefill"}
    assert {f"rank{k}.logits" for k in range(tp)} | {f"rank{k}.present_key_values" for k in range(tp)} <= outputs
    vs_tp1 = [c for c in r.checks if c.graph in ("prefill vs tp=1", "decode vs tp=1")]
    assert len(vs_tp1) == 4 + 4 * 15 and max(c.metrics["max_abs"] for c in vs_tp1) < 1e-5
    assert all(t.expected == t.got for t in r.tokens) and len(r.tokens) == 4


def test_rank_graphs_hold_slices_and_explicit_allreduce(tp4):
    folder = tp4.folder
    m = json.loads((folder / "manifest.json").read_text())
    assert m["tp"]["ranks"] == 4 and m["tp"]["kv_replicated"] is True
    assert [r["kv_heads"] for r in m["tp"]["per_rank"]] == [[0, 1], [0, 1], [1, 2], [1, 2]]
    assert [r["vocab"] for r in m["tp"]["per_rank"]] == [[0, 256], [256, 512], [512, 768], [768, 1024]]
    for rank in range(4):
        for name in ("llm_prefill.onnx", "llm_decode.onnx"):
            path = folder / f"rank{rank}" / name
            check_graph(path)  # passes onnx.checker with qvlc.AllReduce registered
            model = onnx.load(str(path), load_external_data=False)
            reduces = [n for n in model.graph.node if n.op_type == OP_TYPE]
            assert len(reduces) == 2 * L and {n.domain for n in reduces} == {DOMAIN}
            assert all(a.s == b"sum" for n in reduces for a in n.attribute if a.name == "reduction")
            dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.output}
            assert dims["logits"] == [1, 1, 256]
            assert dims["present_key_values"][3] == 1  # this rank's kv head only
        split = {p["initializer"]: p for p in m["tp"]["per_rank"][rank]["split_points"]}
        names = {t.name for t in onnx.load(str(folder / f"rank{rank}" / "llm_prefill.onnx"),
                                           load_external_data=False).graph.initializer}
        assert set(split) <= names  # the manifest names the graph's own initializers
        assert split["stack.layers.0.self_attn.q_proj.weight_t"]["heads"] == [rank, rank + 1]


def test_rank_weights_are_slices_not_copies(tp1, tp4):
    full = (tp1.folder / "llm_weights.data").stat().st_size
    per_rank = [(tp4.folder / f"rank{r}" / "llm_weights.data").stat().st_size for r in range(4)]
    # q/o/gate/up/down/lm_head are split four ways; only k/v (replicated) and norms are not.
    assert max(per_rank) < 0.4 * full


def test_recombined_ranks_equal_the_unsplit_graphs(tp1, tp2):
    """Both artifacts through ONNX Runtime on the same host inputs: the split changes nothing but sum order."""
    rng = np.random.default_rng(0)
    a, b = LlmRuntime(tp1.folder), LlmRuntime(tp2.folder)
    embeds = (rng.standard_normal((S, 64)) * 0.1).astype(np.float32)
    mask = np.r_[np.zeros(10, np.int64), np.ones(S - 10, np.int64)]
    pos = np.broadcast_to(np.maximum(np.cumsum(mask) - 1, 0), (3, S)).astype(np.int64)
    la, lb = a.logits_of(a.prefill(embeds, pos, mask)), b.logits_of(b.prefill(embeds, pos, mask))
    np.testing.assert_allclose(lb, la, atol=1e-5)
    for step in range(3):
        e = embeds[step]
        la = a.logits_of(a.decode(e, S - 10 + step))
        lb = b.logits_of(b.decode(e, S - 10 + step))
        np.testing.assert_allclose(lb, la, atol=1e-5)


def test_large_models_skip_the_unsplit_module_and_say_so(tp2, monkeypatch):
    """Above UNSPLIT_MAX_BYTES (a 7B's unsplit fp16 module is 14 GB, and torch computes fp16 at ~1 GFLOP/s on
    CPU) the tp = 1 comparison is not run; the report says so, and every rank is still checked slice by slice."""
    import qvlc.validate.llm as validate_llm

    monkeypatch.setattr(validate_llm, "UNSPLIT_MAX_BYTES", 0)
    report = validate_artifact(tp2.folder)
    assert report.passed, report.failures
    assert not [c for c in report.checks if c.graph.endswith("vs tp=1")]
    assert {"rank0.logits", "rank1.present_key_values", "logits"} <= {c.output for c in report.checks}
    assert any("tp = 1 comparison was not run" in n for n in report.notes)


def test_swapped_rank_weights_are_caught(tp2, copy_artifact, reseal):
    folder = copy_artifact(tp2.folder)
    w0, w1 = folder / "rank0" / "llm_weights.data", folder / "rank1" / "llm_weights.data"
    tmp = folder / "swap"
    shutil.move(w0, tmp)
    shutil.move(w1, w0)
    shutil.move(tmp, w1)
    reseal(folder)  # past the integrity check: the parity check must see the swap
    report = validate_artifact(folder)
    failed = {c.output for c in report.checks if not c.passed}
    # The AllReduce sum does not care which rank holds which heads; the vocab slices and KV heads do.
    assert {"logits", "rank0.logits", "rank0.present_key_values"} <= failed


def test_wrong_kv_replication_is_caught(tmp_path, monkeypatch):
    import qvlc.export.llm as export_llm
    from qvlc.models.common.tp import RankLayout
    from qvlc.models.common.tp import rank_layout as right

    def wrong(text, tp, rank):  # round-robin kv heads: rank 1 would read kv head 1 for query head 1
        lay = right(text, tp, rank)
        return RankLayout(**{**lay.__dict__, "kv_head_start": rank % text.kv_heads}) if tp > 1 else lay

    monkeypatch.setattr(export_llm, "rank_layout", wrong)  # the export slices wrongly; validation's reference is right
    cfg = config_from_dict({"name": "bad_tp", "part": "llm", "export": {"prefill_len": S, "max_context": C, "tp": 4},
                            "validate": {"decode_steps": 1, "generate_tokens": 2}, "output": {"dir": str(tmp_path)}})
    with pytest.raises(ParityError) as info:
        compile_artifact(cfg)
    assert "prefill/text_short/logits" in str(info.value)
    assert not (tmp_path / "bad_tp").exists()


def test_parallel_workers_write_the_same_bytes(tp2, tmp_path):
    cfg = config_from_dict({"name": tp2.folder.name, "part": "llm",
                            "export": {"prefill_len": S, "max_context": C, "tp": 2, "workers": 2},
                            "validate": {"enabled": False}, "output": {"dir": str(tmp_path)}})
    result = compile_artifact(cfg)
    assert result.export.worker_peak_rss_mb > 0
    a = {f["path"]: f["sha256"] for f in json.loads((tp2.folder / "manifest.json").read_text())["files"]}
    b = {f["path"]: f["sha256"] for f in json.loads((result.folder / "manifest.json").read_text())["files"]}
    graphs = [p for p in a if p.startswith("rank")]
    assert len(graphs) == 6 and all(a[p] == b[p] for p in graphs)


@pytest.mark.parametrize("tp,fragment", [
    (3, "4 attention heads are not divisible by 3"),
    (8, "4 attention heads are not divisible by 8"),
])
def test_bad_tp_refused_before_loading(tp, fragment, monkeypatch):
    import qvlc.compile.stages as pipeline

    monkeypatch.setattr(pipeline, "load_checkpoint", lambda *a: pytest.fail("weights were loaded"))
    cfg = config_from_dict({"name": "x", "part": "llm", "export": {"prefill_len": S, "max_context": C, "tp": tp}})
    with pytest.raises(ConfigError) as info:
        checked_plan(cfg)
    assert fragment in str(info.value) and "tp = 1, 2, 4" in info.value.fix


def test_a_killed_export_worker_is_an_error_not_a_hang():
    """A worker the kernel kills (here: one that exits at once, as an OOM kill looks to the parent) stops the export
    with an error naming export.workers; multiprocessing.Pool used to wait for its result forever."""
    import os
    import signal

    from qvlc.errors import EnvironmentFailure
    from qvlc.export.llm import run_in_workers

    signal.alarm(300)  # a regression fails here instead of hanging CI
    try:
        with pytest.raises(EnvironmentFailure) as info:
            run_in_workers(os._exit, [9, 9], 2)
    finally:
        signal.alarm(0)
    assert info.value.key == "export.workers" and "export.workers: 1" in info.value.fix


def test_decode_many_equals_each_sequence_decoded_alone(tp2):
    """Validation decodes all its prompts together, segment by segment (so each rank's weights are read once a
    step for all of them): every sequence's logits and KV are bitwise what decoding it alone gives."""
    rng = np.random.default_rng(1)
    rt = LlmRuntime(tp2.folder)
    windows = []
    for pad in (10, 30):
        embeds = (rng.standard_normal((S, 64)) * 0.1).astype(np.float32)
        mask = np.r_[np.zeros(pad, np.int64), np.ones(S - pad, np.int64)]
        pos = np.broadcast_to(np.maximum(np.cumsum(mask) - 1, 0), (3, S)).astype(np.int64)
        windows.append((embeds, pos, mask, pad))
    alone, states = [], []
    for embeds, pos, mask, pad in windows:
        rt.prefill(embeds, pos, mask)
        states.append(rt.snapshot())
        alone.append([rt.logits_of(rt.decode(embeds[k], S - pad + k)) for k in range(3)])
    together = [[] for _ in windows]
    for k in range(3):
        outs = rt.decode_many(states, [w[0][k] for w in windows], [S - w[3] + k for w in windows])
        for seq, o in zip(together, outs):
            seq.append(rt.logits_of(o))
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert [s.slot for s in states] == [S + 3, S + 3]


def test_validate_cases_runs_the_chosen_prompts_and_reports_the_rest(tp2, compiled):
    result = compiled("llm_tp2_one_case", prefill_len=S, max_context=C, tp=2, validate={"cases": ["two_images_full"]})
    one = result.report
    assert one.passed, one.failures
    assert one.cases == {"run": ["two_images_full"],
                         "skipped": ["text_short", "one_image_half", "image_and_video"]}
    assert [t.case for t in one.tokens] == ["two_images_full"]
    assert {c.case.split("/")[0] for c in one.checks} == {"two_images_full"}
    assert any("validate.cases: text_short, one_image_half, image_and_video skipped" in n for n in one.notes)
    # the same prompt as in the full run: the same tokens and figures
    full = tp2.report
    assert [t.got for t in full.tokens if t.case == "two_images_full"] == [one.tokens[0].got]
    same = {(c.graph, c.case, c.output): c.metrics for c in full.checks if c.case.startswith("two_images_full")}
    assert {(c.graph, c.case, c.output): c.metrics for c in one.checks} == same
    assert {p["phase"] for p in one.phases} >= {"prefill (onnxruntime)", "decode (onnxruntime)", "oracle"}
    md = (result.folder / "parity.md").read_text()
    assert "validate.cases: text_short" in md and "Validation phases" not in md  # timings stay out of the artifact
    assert json.loads((result.folder / "parity.json").read_text())["cases"] == one.cases
