"""fp16 hazards on planted outliers: the MLP of the last vision block and of the last decoder layer (where the real
ones were reported: llama.cpp 17534, transformers 33294), scaled past fp16's range, in a tiny checkpoint of each
family written with save_pretrained and compiled through the real loading path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qvlc.config import config_from_dict
from qvlc.errors import ParityError
from qvlc.models import FAMILIES
from qvlc.models import family as family_of
from qvlc.models.common.tiny import tiny_checkpoint
from qvlc.pipeline import compile_artifact
from qvlc.validate.ranges import FP16_MAX, LINEAR, SCORES, RangeRecorder

TARGET = 2e5  # the planted channel's largest output: past fp16's 65504, like the reported vision MLP (~2e5)


def _plant(mlp: torch.nn.Module, run) -> str:
    """Massive activations, as real checkpoints have them: the MLP's input projections x30, then one output row
    of its last projection scaled until that channel peaks at TARGET on ``run()`` — every weight stays finite in
    fp16 (the overflow is in the activations, not the storage). Returns the last projection's name."""
    last = "fc2" if hasattr(mlp, "fc2") else "down_proj"
    with torch.no_grad():
        for name in ("fc1", "gate_proj", "up_proj"):
            if hasattr(mlp, name):
                getattr(mlp, name).weight.mul_(30)
        seen = []
        handle = getattr(mlp, last).register_forward_hook(lambda m, i, out: seen.append(out[..., 3].abs().max()))
        run()
        handle.remove()
        getattr(mlp, last).weight[3] *= TARGET / float(max(seen))
        assert getattr(mlp, last).weight.abs().max() < 3e4
    return last


def planted(family: str, folder):
    """The family's tiny checkpoint with outliers planted; returns (folder, vision module, text module)."""
    fam = family_of(family)
    src = tiny_checkpoint(family=fam)
    shutil.copytree(src, folder)
    model = fam.hf_class("model").from_pretrained(src, dtype=torch.float32).eval()
    visual, text = model.model.visual, model.model.language_model
    grid = torch.tensor([[1, 8, 8]])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(64, visual.patch_embed.proj.weight[0].numel(), generator=g)
    vision_last = _plant(visual.blocks[-1].mlp, lambda: visual(pixels, grid_thw=grid))
    ids = torch.randint(0, model.config.text_config.vocab_size, (1, 48), generator=g)
    text_last = _plant(text.layers[-1].mlp, lambda: text(input_ids=ids))
    model.save_pretrained(folder)
    return (str(folder), f"model.visual.blocks.{len(visual.blocks) - 1}.mlp.{vision_last}",
            f"model.language_model.layers.{len(text.layers) - 1}.mlp.{text_last}")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def outliers(request, tmp_path_factory):
    return request.param, *planted(request.param, tmp_path_factory.mktemp("planted") / request.param)


def _compile(tmp_path, checkpoint, part, dtype):
    export = {"dtype": dtype, **({"prefill_len": 128, "max_context": 160} if part == "llm" else {})}
    return compile_artifact(config_from_dict({"name": f"{part}_{dtype}", "part": part,
                                              "model": {"checkpoint": checkpoint}, "export": export,
                                              "output": {"dir": str(tmp_path)}}))


@pytest.mark.parametrize("part", ["visual", "llm"])
def test_fp16_compile_fails_and_names_the_layer(outliers, part, tmp_path):
    family, checkpoint, vision_module, text_module = outliers
    with pytest.raises(ParityError) as info:
        _compile(tmp_path, checkpoint, part, "fp16")
    module = vision_module if part == "visual" else text_module
    assert f"{module}: linear output reaches" in str(info.value)
    hazards = json.loads((tmp_path / f"{part}_fp16.failed" / "parity.json").read_text())["fp16_ranges"]["hazards"]
    # the planted linear and the residual stream it feeds; nothing before it, nothing after the next norm
    assert {h["module"] for h in hazards if h["level"] == "overflow"} == {module, module.rsplit(".mlp", 1)[0]}


@pytest.mark.parametrize("part", ["visual", "llm"])
def test_fp32_compile_passes_and_reports_the_hazard_as_advice(outliers, part, tmp_path):
    family, checkpoint, vision_module, text_module = outliers
    r = _compile(tmp_path, checkpoint, part, "fp32")
    assert r.report.passed, r.report.failures
    module = vision_module if part == "visual" else text_module
    assert module in {h["module"] for h in r.report.hazards if h["level"] == "overflow"}
    md = (r.folder / "parity.md").read_text()
    assert "advice for an fp16 build" in md and module in md


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_outliers_no_hazards(compiled, family):
    for part in ("visual", "llm"):
        r = compiled(f"clean_{family}_{part}", part=part, checkpoint=f"tiny:{family}", dtype="fp16")
        assert r.report.passed and r.report.hazards == []
        assert set(r.report.range_peaks) == {LINEAR, "residual stream", SCORES}
        assert all(0 < p["max_abs"] < 100 for p in r.report.range_peaks.values())


def test_recorder_attributes_rows_to_cases_and_skips_masked_scores():
    rec = RangeRecorder()
    x = torch.zeros(6, 4)
    x[1, 0], x[4, 2] = 7.0, -9e4
    rec.observe("m", LINEAR, x, [("a", 0, 3), ("b", 3, 6)])
    (stat,) = rec.stats.values()
    assert (stat.max_abs, stat.case, stat.level()) == (9e4, "b", "overflow")
    scores = torch.full((1, 2, 3, 3), torch.finfo(torch.float32).min)
    scores[..., 0] = 2.0
    rec.observe("s", SCORES, scores, [("c", 0, 1)], whole=True)
    assert rec.stats[("s", SCORES)].max_abs == 2.0  # the mask's fp32 minimum is not a magnitude
    tiny = torch.full((100,), 1e-9)
    rec.observe("u", LINEAR, tiny[None], [("d", 0, 1)])
    assert rec.stats[("u", LINEAR)].level() == "underflow" and FP16_MAX > 1e-9
