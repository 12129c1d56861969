"""fp16 hazards on planted outliers: the MLP of the last vision block and of the last decoder layer (where the real
ones were reported: llama.cpp 17534, transformers 33294), scaled past fp16's range, in a tiny checkpoint of each
family written with save_pretrained and compiled through the real loading path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.compile.stages import compile_artifact
from qvlc.config.loading import config_from_dict
from qvlc.errors import ParityError
from qvlc.models import FAMILIES
from qvlc.models import family as family_of
from qvlc.validate.ranges import FP16_MAX, KINDS, LINEAR, SCORES, RangeRecorder

TARGET = 2e5  # the planted channel's largest output: past fp16's 65504, like the reported vision MLP (~2e5)


def _plant(mlp: torch.nn.Module, run, target: float = TARGET) -> str:
    """A massive activation, as real checkpoints have them: the MLP's input projections x30, then output channel 3
    of its last projection made to read one intermediate unit (the one with the largest mean activation on
    ``run()``), scaled so the channel peaks at TARGET. One term, no cancellation: the outlier is as well
    conditioned as the activation it copies, and every weight stays finite in fp16 (the overflow is in the
    activations, not the storage). Returns the last projection's name."""
    last = next(n for n in ("fc2", "linear_fc2", "down_proj") if hasattr(mlp, n))
    proj = getattr(mlp, last)
    with torch.no_grad():
        for name in ("fc1", "linear_fc1", "gate_proj", "up_proj"):
            if hasattr(mlp, name):
                getattr(mlp, name).weight.mul_(30)
        seen = []
        handle = proj.register_forward_hook(lambda m, i, out: seen.append(i[0].reshape(-1, i[0].shape[-1])))
        run()
        handle.remove()
        act = torch.cat(seen)
        unit = int(act.mean(0).abs().argmax())
        proj.weight[3] = 0.0
        proj.weight[3, unit] = target / float(act[:, unit].abs().max())
        assert proj.weight.abs().max() < 3e4
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
        assert set(r.report.range_peaks) == set(KINDS)
        assert all(0 < p["max_abs"] < 100 for p in r.report.range_peaks.values())


def test_deepstack_mergers_are_range_checked_and_can_be_fp32_islands(tmp_path):
    """Qwen3-VL's DeepStack mergers read the residual stream midway and have their own linears: the range check
    hooks them (a planted activation near fp16's maximum in one is reported by name), fp32_layers: auto makes
    that merger an island (its weights stored in fp32, the others' in fp16) and the fp16 compile passes."""
    import onnx
    from onnx import TensorProto

    src = tiny_checkpoint(family=family_of("qwen3_vl"))
    model = family_of("qwen3_vl").hf_class("model").from_pretrained(src, dtype=torch.float32).eval()
    visual = model.model.visual
    pixels = torch.randn(64, visual.patch_embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
    _plant(visual.deepstack_merger_list[1], lambda: visual(pixels, grid_thw=torch.tensor([[1, 8, 8]])), 4e4)
    shutil.copytree(src, tmp_path / "ck")  # the tokenizer and processor files; the weights are overwritten
    model.save_pretrained(tmp_path / "ck")
    unit = "model.visual.deepstack_merger_list.1"
    plain = _compile(tmp_path, str(tmp_path / "ck"), "visual", "fp16")
    assert {h["module"] for h in plain.report.hazards if h["level"] == "near"} == {f"{unit}.linear_fc2"}
    r = compile_artifact(config_from_dict({"name": "ds_auto", "part": "visual", "output": {"dir": str(tmp_path)},
                                           "model": {"checkpoint": str(tmp_path / "ck")},
                                           "export": {"dtype": "fp16", "fp32_layers": "auto"}}))
    assert r.report.passed, r.report.failures
    assert json.loads((r.folder / "manifest.json").read_text())["fp32"]["units"] == [unit]
    inits = {i.name: i.data_type for i in onnx.load(str(r.folder / "visual.onnx"), load_external_data=False)
             .graph.initializer if "linear_fc2.weight" in i.name and "deepstack" in i.name}
    assert {n.split("deepstack_merger_list.")[1][0]: t for n, t in inits.items()} == \
        {"0": TensorProto.FLOAT16, "1": TensorProto.FLOAT}


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


@pytest.mark.parametrize("part", ["visual", "llm"])
def test_auto_fp32_islands_pass_what_plain_fp16_fails(outliers, part, tmp_path, request):
    """export.fp32_layers: auto keeps the flagged MLP, the residual stream from its layer on and the module reading
    the residual's end in fp32 (weights stored in fp32); the fp16 compile then passes parity and the range check,
    and the manifest lists the islands."""
    import onnx
    from onnx import TensorProto

    if (outliers[0], part) == ("qwen3_vl", "visual"):  # strict: reported the day it passes
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "Qwen3-VL tiny tower with the planted 2e5 activation: with the islands it lands at max abs 0.70 "
            "against 0.575; the fp32 eager module itself is 0.096 off transformers there (the outlier's row loses "
            "fp32 precision in the merger's LayerNorm) — docs/families.md, left alone")))

    family, checkpoint, vision_module, text_module = outliers
    module = vision_module if part == "visual" else text_module
    export = {"dtype": "fp16", "fp32_layers": "auto", **({"prefill_len": 128, "max_context": 160}
                                                        if part == "llm" else {})}
    r = compile_artifact(config_from_dict({"name": f"{part}_auto", "part": part, "model": {"checkpoint": checkpoint},
                                           "export": export, "output": {"dir": str(tmp_path)}}))
    assert r.report.passed, r.report.failures
    unit = module.rsplit(".", 1)[0]
    fp32 = json.loads((r.folder / "manifest.json").read_text())["fp32"]
    deep = [f"model.visual.deepstack_merger_list.{j}" for j in range(2 if family == "qwen3_vl" else 0)]
    heads = deep + ["model.visual.merger"] if part == "visual" else ["lm_head"]  # the modules reading the residual
    assert fp32["units"] == [unit, *heads] and fp32["source"] == "auto"
    assert fp32["residual_from"] == int(unit.split(".")[-2])
    assert all(h["fp32"] for h in r.report.hazards if h["level"] == "overflow") and r.report.hazards
    graph = next(r.folder.rglob("*.onnx"))
    inits = {i.name: i.data_type for i in onnx.load(str(graph), load_external_data=False).graph.initializer}
    last = module.rsplit(".", 1)[1]
    island = [t for n, t in inits.items() if f"mlp.{last}.weight" in n and f".{unit.split('.')[-2]}." in n]
    other = [t for n, t in inits.items() if f"mlp.{last}.weight" in n and f".{unit.split('.')[-2]}." not in n]
    assert island and set(island) == {TensorProto.FLOAT} and set(other) == {TensorProto.FLOAT16}
    assert "fp32 island" in (r.folder / "parity.md").read_text()


@pytest.mark.parametrize("layers,dtype,fragment", [
    (["model.language_model.layers.9.mlp"], "fp16", "names no module of the llm part"),
    (["model.visual.blocks.1.mlp"], "fp16", "names no module of the llm part"),
    (["lm_head"], "fp32", "this compile is fp32"),
    (["auto", "lm_head"], "fp16", "auto cannot be combined"),
    ("all", "fp16", "expected a list of module names or auto"),
])
def test_bad_fp32_layers_refused_before_loading(layers, dtype, fragment):
    from qvlc.compile.plan import checked_plan
    from qvlc.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        checked_plan(config_from_dict({"name": "x", "part": "llm", "export": {"dtype": dtype, "fp32_layers": layers}}))
    assert fragment in str(info.value) and info.value.key == "export.fp32_layers"


def test_given_names_select_units_and_start_the_fp32_residual():
    from qvlc.models.common.islands import islands, text_units, vision_units

    t = islands(["model.language_model.layers.1.mlp.down_proj"], text_units(3))
    assert t.units == ("model.language_model.layers.1.mlp", "lm_head") and t.residual_from == 1
    v = islands(["model.visual.blocks.*.mlp.fc2"], vision_units(2))
    assert v.units == ("model.visual.blocks.0.mlp", "model.visual.blocks.1.mlp", "model.visual.merger")
    assert islands([], text_units(3)).units == () and not islands([], text_units(3))
    deep = vision_units(2, deepstack=2)  # Qwen3-VL: a DeepStack merger reads the residual midway, like the merger
    assert islands(["model.visual.deepstack_merger_list.1"], deep).units == ("model.visual.deepstack_merger_list.1",)
    assert islands(["model.visual.blocks.1.mlp"], deep).units == (
        "model.visual.blocks.1.mlp", "model.visual.deepstack_merger_list.0", "model.visual.deepstack_merger_list.1",
        "model.visual.merger")
