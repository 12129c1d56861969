"""The streamed oracle (one decoder layer in memory at a time) equals the in-memory transformers model, and the
one-pass greedy check gives transformers `generate`'s verdict, down to the token where a graph diverges."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from qvlc.checkpoint.hf_model import load_checkpoint
from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.models import FAMILIES
from qvlc.models import family as family_of
from qvlc.validate.oracle import InMemoryOracle, OracleInput, StreamedOracle


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    fam = family_of(request.param)
    folder = tiny_checkpoint(family=fam)
    _, dims = inspect_checkpoint(folder)
    return fam, folder, dims, load_checkpoint(folder)


def sequences(dims) -> list[OracleInput]:
    t, rng = dims.tokens, np.random.default_rng(0)
    ids = [5, 6, t.vision_start, *[t.image] * 4, t.vision_end, 7, t.vision_start, *[t.video] * 6, t.vision_end, 9, 10,
           11, 12]
    rows = {t.image: rng.standard_normal((4, dims.text.hidden)).astype(np.float32),
            t.video: rng.standard_normal((6, dims.text.hidden)).astype(np.float32)}
    k = len(dims.vision.deepstack)  # Qwen3-VL: DeepStack rows added after the first k layers, in both oracles
    deep = {t.image: rng.standard_normal((k, 4, dims.text.hidden)).astype(np.float32),
            t.video: rng.standard_normal((k, 6, dims.text.hidden)).astype(np.float32)} if k else {}
    return [OracleInput(np.array(ids), rows, np.array([[1, 4, 4]]), np.array([[3, 2, 4]]), (2.5,), len(ids) - 3,
                        "", deep),
            OracleInput(np.arange(1, 9), {}, None, None, None, 5)]


def test_streamed_oracle_equals_the_loaded_model(tiny):
    fam, folder, dims, ck = tiny
    streamed = StreamedOracle(fam, folder, dims).run(sequences(dims))
    loaded = InMemoryOracle(fam, ck.model, dims).run(sequences(dims))
    for a, b in zip(streamed, loaded):
        assert a.delta == b.delta and a.logits.shape == b.logits.shape and a.kv.shape == b.kv.shape
        np.testing.assert_allclose(a.logits, b.logits, atol=2e-6, rtol=1e-6)
        np.testing.assert_allclose(a.kv, b.kv, atol=2e-6, rtol=1e-6)
    assert np.abs(streamed[0].logits).max() > 0.1
    if dims.vision.deepstack:  # and the DeepStack rows matter (both oracles add them)
        plain = StreamedOracle(fam, folder, dims).run([replace(sequences(dims)[0], deepstack={})])
        assert np.abs(plain[0].logits - streamed[0].logits).max() > 1e-2


def test_streamed_oracle_reads_each_layer_once(tiny, monkeypatch):
    fam, folder, dims, _ = tiny
    oracle = StreamedOracle(fam, folder, dims)
    reads: list[str] = []
    import qvlc.validate.oracle as oracle_module

    real = oracle_module.materialize
    monkeypatch.setattr(oracle_module, "materialize",
                        lambda cls, *a, tree: (reads.append(cls.__name__), real(cls, *a, tree=tree))[1])
    oracle.run(sequences(dims) * 3)  # three times as many sequences: still one read per layer
    assert reads.count(oracle.shell.layer_cls.__name__) == dims.text.layers


@torch.no_grad()
def test_one_pass_verdict_equals_generate(compiled):
    """On the tiny model the graphs' greedy tokens equal transformers `generate` on the same prompt (text), and
    the report's one-pass check says so."""
    r = compiled("oracle_fp32", prefill_len=64, max_context=96)
    check = next(t for t in r.report.tokens if t.case == "text_short")
    from qvlc.validate.llm_cases import build_cases

    folder = tiny_checkpoint()
    _, dims = inspect_checkpoint(folder)
    model = load_checkpoint(folder).model
    ids = torch.from_numpy(build_cases(dims, 64, 0, 1.0)[0].ids)[None]
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert check.got == want and check.expected == want and check.passed


@pytest.mark.parametrize("k", [0, 5])
def test_a_graph_diverging_at_token_k_is_reported_at_k(tmp_path, monkeypatch, k):
    """The decode graph is made to prefer another token from step k on: the check reports the split at k."""
    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict
    from qvlc.errors import ParityError
    from qvlc.runtime.llm import LlmRuntime

    prefill, decode_many = LlmRuntime.prefill, LlmRuntime.decode_many

    def push(outs, token: int = 3):
        out = [dict(o) for o in outs]
        out[0]["logits"] = out[0]["logits"].copy()
        out[0]["logits"].reshape(-1)[token] += 1e3
        return out

    def wrong_prefill(self, *a):
        return push(prefill(self, *a)) if k == 0 else prefill(self, *a)

    def wrong_decode_many(self, states, *a):  # validation decodes its prompts together
        steps = [s.slot - self.spec.prefill_len for s in states]
        outs = decode_many(self, states, *a)
        return [push(o) if step >= k - 1 and k > 0 else o for o, step in zip(outs, steps)]

    monkeypatch.setattr(LlmRuntime, "prefill", wrong_prefill)
    monkeypatch.setattr(LlmRuntime, "decode_many", wrong_decode_many)
    cfg = config_from_dict({"name": "div", "part": "llm", "export": {"prefill_len": 64, "max_context": 96},
                            "validate": {"decode_steps": 2, "generate_tokens": 8}, "output": {"dir": str(tmp_path)}})
    with pytest.raises(ParityError) as info:
        compile_artifact(cfg)
    assert f"greedy tokens diverge at step {k} of 8" in str(info.value)


def test_streamed_vision_tower_equals_the_loaded_one(tiny):
    """Every case in one forward of transformers' own tower, each block read once, equals the loaded tower run on
    each case alone (images, a video, grids with part-filled windows)."""
    from qvlc.checkpoint.hf_model import load_vision_tower
    from qvlc.validate.vision_oracle import StreamedVisionOracle

    fam, folder, dims, _ = tiny
    rng = np.random.default_rng(1)
    cases = []
    for grids in ([[1, 6, 10]], [[2, 4, 4], [1, 2, 8]], [[1, 2, 30]]):
        g = np.array(grids)
        cases.append((rng.standard_normal((int(g.prod(axis=1).sum()), dims.vision.patch_dim)).astype(np.float32), g))
    oracle = StreamedVisionOracle(fam, folder, dims)
    got = oracle.run(cases)
    tower = load_vision_tower(folder).visual
    with torch.no_grad():
        for (pixels, grids), x in zip(cases, got):
            want = fam.tower_rows(tower(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)))
            np.testing.assert_allclose(x, want, atol=1e-6, rtol=1e-6)
    assert [b.loads for b in oracle.tower.blocks] == [1] * dims.vision.depth
