"""Parity of the visual graph against the unmodified transformers vision tower (fp32).

The ONNX side goes through the deployment host path (``VisualRuntime``): real patches from the artifact's own
preprocessing of synthetic images and a video, and the family's host inputs (padding to N, cos/sin, masks, and for
window attention the window order, undone on the output rows). The oracle runs ``model.visual(pixel_values,
grid_thw)`` on the same unpadded fp32 patches.

Checks, in order: the graph interface (names → shapes → dtypes against the contract), then per case the real rows
of every ``image_embeds_i`` chunk and of the concatenated embedding, and that the padding rows stay finite. Case
sizes follow N, so every case fits whatever the compiled N is.

A graph call costs the same whatever the number of real patches (2B, fp16, N=5120: about 45 s on 2 CPU
cores), so cases that fit together share one call: their grids are concatenated, and each case's rows are compared
with the oracle run on that case alone. The block-diagonal mask must keep them apart, so sharing a call is also a
test of it. ``heavy_padding`` always runs alone: its point is an input that is mostly padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qvlc.artifact.spec import VisualSpec
from qvlc.checkpoint.hf_model import LoadedCheckpoint
from qvlc.host.preprocess import PreprocessConfig, image_to_patches, video_to_patches
from qvlc.precision import Runtime
from qvlc.runtime.artifact import read_preprocess
from qvlc.runtime.tvm_session import TvmBuildError
from qvlc.runtime.visual import VisualRuntime
from qvlc.validate.divergence import LayerCapture, diagnose
from qvlc.validate.interface import check_interface
from qvlc.validate.metrics import ParityReport
from qvlc.validate.phases import Phases
from qvlc.validate.quant_error import visual_quantization_error
from qvlc.validate.ranges import RangeRecorder, remove
from qvlc.validate.vision_oracle import StreamedVisionOracle, hook_tower

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan

GRAPH = "visual"
MAX_ASPECT = 200  # smart_resize's limit on the longer side over the shorter one


@dataclass
class VisualCase:
    name: str
    pixel_values: np.ndarray  # float32 [n, patch_dim], real patches only
    grids: np.ndarray  # int64 [k, 3], (t, h, w) in patches before merging
    alone: bool = False  # never shares a graph call with another case

    @property
    def patches(self) -> int:
        return int(self.grids.prod(axis=1).sum())


def _grid(patches: int, aspect: float, merge: int, t: int = 1) -> tuple[int, int, int]:
    """A grid of at most ``patches`` patches per frame (at least one merge unit), width/height about ``aspect``."""
    units = max(1, patches // merge**2)
    a = max(1, round((units / aspect) ** 0.5))
    b = max(1, units // a)
    return (t, a * merge, b * merge)


def case_grids(n: int, merge: int) -> dict[str, list[tuple[int, int, int]]]:
    """The grids of every case, sized from N (each case fits in N patches)."""
    wide = min(n // merge // merge * merge, MAX_ASPECT * merge)
    return {
        "small_image": [_grid(n // 4, 4 / 3, merge)],
        # an odd number of merged rows and columns: not a multiple of any window, so windows end part-filled
        "odd_grid": [_odd_grid(n // 8 // merge**2, merge)],
        "extreme_aspect": [(1, merge, wide)],
        "two_images": [_grid(n * 3 // 10, 0.5, merge), _grid(n * 45 // 100, 2.0, merge)],
        "video_t2": [_grid(n // 4, 1.5, merge, t=2)],
        "heavy_padding": [(1, merge, 2 * merge)],
    }


def _odd_grid(tokens: int, merge: int) -> tuple[int, int, int]:
    """About ``tokens`` merged tokens in an odd number of merged rows and of merged columns."""
    def odd(k: int) -> int:
        return k if k % 2 else max(1, k - 1)

    rows = odd(max(1, int(tokens**0.5)))
    return (1, merge * rows, merge * odd(max(1, tokens // rows)))


def build_cases(spec: VisualSpec, pre: PreprocessConfig, seed: int = 0) -> list[VisualCase]:
    """Synthetic images (random uint8 pixels) and a 2-temporal-patch video through the artifact's preprocessing.

    The pixel bounds are widened so each image keeps exactly the size of its grid; everything else (patch sizes,
    mean, std, rescale) is the artifact's own preprocessing.
    """
    rng = np.random.default_rng(seed)
    ps = pre.patch_size
    big = max(pre.max_pixels, spec.max_patches * ps**2)
    exact = dataclasses.replace(pre, min_pixels=pre.factor**2, max_pixels=big, video_min_pixels=pre.factor**2,
                                video_max_pixels=big)

    def frames(t: int, h: int, w: int) -> list[np.ndarray]:
        return [rng.integers(0, 256, size=(h * ps, w * ps, pre.in_chans), dtype=np.uint8)
                for _ in range(t * pre.temporal_patch_size)]

    cases = []
    for name, grids in case_grids(spec.max_patches, spec.merge_size).items():
        parts = []
        for t, h, w in grids:
            f = frames(t, h, w)
            parts.append(image_to_patches(f[0], exact) if t == 1 else video_to_patches(f, exact))
        pixels = np.concatenate([p for p, _ in parts])
        got = np.stack([g for _, g in parts])
        if got.tolist() != [list(g) for g in grids]:  # a bug in this file, not in the artifact
            raise RuntimeError(f"case {name}: preprocessing produced grids {got.tolist()}, wanted {grids}")
        cases.append(VisualCase(name, pixels, got, alone=name == "heavy_padding"))
    return cases


def pack_runs(cases: list[VisualCase], n: int) -> list[list[VisualCase]]:
    """Group cases into graph calls of at most ``n`` patches: first fit, largest case first; ``alone`` cases
    get a call of their own. Calls keep the order of their first case in ``cases``."""
    runs: list[list[VisualCase]] = []
    for case in sorted(cases, key=lambda c: -c.patches):
        fit = None if case.alone else next(
            (r for r in runs if not r[0].alone and sum(c.patches for c in r) + case.patches <= n), None)
        if fit is None:
            runs.append([case])
        else:
            fit.append(case)
    order = {c.name: i for i, c in enumerate(cases)}
    return sorted(runs, key=lambda r: min(order[c.name] for c in r))


@torch.no_grad()
def oracle(ck: LoadedCheckpoint, case: VisualCase, ranges: RangeRecorder, merge_unit: int, family) -> np.ndarray:
    """transformers' vision tower in fp32 on the unpadded patches: [patches / merge_unit, out_hidden × (1 +
    DeepStack layers)]."""
    handles = hook_tower(ck.visual, ranges, [(case.name, 0, case.patches)], merge_unit)
    try:
        with ranges.recording():
            return family.tower_rows(ck.visual(torch.from_numpy(case.pixel_values),
                                               grid_thw=torch.from_numpy(case.grids)))
    finally:
        remove(handles)


def visual_cases(plan: Plan, seed: int = 0) -> list[VisualCase]:
    """The validation cases, preprocessed as the artifact will (from the checkpoint's preprocessor config)."""
    from qvlc.checkpoint.processor import preprocess_config

    pre = preprocess_config(plan.checkpoint, plan.dims.vision, plan.family.video_rules)
    return build_cases(plan.visual_spec, pre, seed)


def reference_embeddings(plan: Plan, ck: LoadedCheckpoint | None, cases: list[VisualCase],
                         ranges: RangeRecorder) -> dict[str, np.ndarray]:
    """transformers' tower on every case: the loaded one (``ck``), or streamed — over every case at once, one
    block's weights at a time — recording the fp16 ranges either way."""
    if ck is not None:
        return {c.name: oracle(ck, c, ranges, plan.visual_spec.merge_unit, plan.family) for c in cases}
    streamed = StreamedVisionOracle(plan.family, plan.checkpoint, plan.dims, plan.visual_quant)
    names = [c.name for c in cases]
    return dict(zip(names, streamed.run([(c.pixel_values, c.grids) for c in cases], names, ranges)))


def validate_visual(plan: Plan, ck: LoadedCheckpoint | None, stage: Path, report: ParityReport,
                    seed: int = 0) -> None:
    """Record every interface and value check of ``stage/visual.onnx`` in ``report``."""
    spec = plan.visual_spec
    (graph, path, sig), = plan.family.declared_graphs(stage, visual=spec)
    if not check_interface(report, graph, path, sig):
        report.notes.append("value checks skipped: the graph interface does not match the contract")
        return
    offsets, phases = np.cumsum([0, *spec.output_widths]), Phases()
    pre = read_preprocess(stage)
    cases = chosen_cases(plan, build_cases(spec, pre, seed), report)
    ranges = RangeRecorder(attn_name="attn")
    with phases.phase("oracle", f"transformers' vision tower, fp32, {len(cases)} cases"):
        refs = reference_embeddings(plan, ck, cases, ranges)
    if ck is not None:
        report.notes.append("oracle: the loaded transformers vision tower")
    ranges.to_report(report, plan.islands)
    calls = pack_runs(cases, spec.max_patches)
    for i, run in enumerate(calls):
        report.notes.append(f"graph call {i}: " + ", ".join(f"{c.name} (grids {c.grids.tolist()})" for c in run) +
                            f": {sum(c.patches for c in run)} of {spec.max_patches} patches real")
    v = plan.cfg.validate
    outputs: dict[str, np.ndarray] = {}  # ONNX Runtime's embeddings per case (the quantization error reads them)
    for rt in v.runtimes:  # one runtime's session alive at a time
        try:
            runtime = VisualRuntime(stage, spec, plan.family, pre, runtime=rt)
        except TvmBuildError as exc:  # the graph does not import into this compiler: a failed check
            with report.using(rt):
                report.fail(GRAPH, str(rt), "build", str(exc))
            continue
        todo = calls if rt == Runtime.ONNXRUNTIME else calls[:v.runtime_cases or len(calls)]
        with report.using(rt), phases.phase(f"graph ({rt})", f"{len(todo)} calls"):
            for i, run in enumerate(todo):
                got = check_call(report, runtime, run, refs, offsets, i)
                if rt == Runtime.ONNXRUNTIME:
                    outputs.update(got)
        if len(todo) < len(calls):
            report.notes.append(f"{rt}: graph calls 0..{len(todo) - 1} of {len(calls)} (validate.runtime_cases)")
        del runtime
    if plan.visual_quant is not None:
        report.notes.append("weights: the oracle carries the dequantized integers of the graph (exactness); "
                            "'Quantization error' compares the graph with the unquantized tower")
        with phases.phase("quantization error", "the graph against the unquantized tower (a second oracle)"):
            visual_quantization_error(plan, report, cases, outputs)
    report.phases = phases.rows
    failed = next((c for c in report.checks if not c.passed and c.metrics), None)
    case = next((c for c in cases if failed is not None and c.name == failed.case), None)
    if case is not None:  # the first divergent block, on the first case that failed (run alone), on its runtime
        capture = LayerCapture(attn_name="attn")
        reference_embeddings(plan, ck, [case], capture)
        feeds = VisualRuntime.feeds_for(spec, plan.family, case.pixel_values, case.grids)
        with report.using(Runtime(failed.runtime)):
            diagnose(report, path, "visual", feeds.feeds, np.arange(case.patches), capture, case.name)


def chosen_cases(plan: Plan, cases: list[VisualCase], report: ParityReport) -> list[VisualCase]:
    """The cases ``validate.cases`` chooses (built first, so a case is the same whichever others run)."""
    chosen, skipped = plan.cfg.validate.chosen(plan.cfg.part)
    report.cases = {"run": chosen, "skipped": skipped}
    if skipped:
        report.notes.append(f"validate.cases: {', '.join(skipped)} skipped (run: {', '.join(chosen)})")
    return [c for c in cases if c.name in chosen]


def check_call(report: ParityReport, runtime: VisualRuntime, run: list[VisualCase], refs: dict[str, np.ndarray],
               offsets: np.ndarray, i: int) -> dict[str, np.ndarray]:
    """One graph call holding the cases of ``run``: each case's rows against the oracle, per chunk and whole, and
    the padding rows finite; returns each case's embeddings."""
    spec = runtime.spec
    feeds = runtime.feeds(np.concatenate([c.pixel_values for c in run]), np.concatenate([c.grids for c in run]))
    outs = runtime.run_graph(feeds)
    start, embeddings = 0, {}
    for case in run:
        rows = slice(start, start + case.patches // spec.merge_unit)
        start = rows.stop
        ref = refs[case.name]
        got = runtime.embeddings(feeds, outs, rows).astype(np.float32)
        for name, a, b in zip(spec.output_names, offsets[:-1], offsets[1:]):
            report.add(GRAPH, case.name, name, ref[:, a:b], got[:, a:b])
        report.add(GRAPH, case.name, "image_embeds", ref, got)
        embeddings[case.name] = got
    for name in spec.output_names:
        if not np.isfinite(outs[name][feeds.tokens:]).all():
            report.fail(GRAPH, f"call{i}", f"{name}[padding rows]", "non-finite values in the padding rows")
    return embeddings
