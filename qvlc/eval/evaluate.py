"""``qvlc eval``: a benchmark through the artifacts — and, with ``--reference``, through the original model — scored
the way VLMEvalKit scores it, with where the two disagree.

Every item runs greedy through ``VlmPipeline`` (the ``qvlc run`` path), its image at the asked pixel bounds
(``--min-pixels``/``--max-pixels``, or VLMEvalKit's Qwen2-VL setting) clamped to what the visual artifact holds, and
shrunk further when prompt and image together would exceed the prefill window (counted in ``resized``); an item
the artifacts still cannot take is scored wrong with its reason, never aborting the run.
``results.json`` is written once, at the end, through a temporary file: an interrupted eval leaves nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qvlc.artifact.trust import Trust
from qvlc.errors import QvlcError
from qvlc.eval.bench_data import Item, read_items
from qvlc.eval.metrics import EvalRun, Prediction, summary
from qvlc.eval.scoring import (
    extract_option,
    mcq_prompt,
    messages,
    normalize,
    vqa_prompt,
    vqa_score,
)
from qvlc.host.preprocess import MAX_PIXELS_BOUND, PreprocessConfig
from qvlc.runtime.media import open_image
from qvlc.runtime.vlm import VlmPipeline

VLMEVALKIT_QWEN2_VL = (1280 * 28 * 28, 16384 * 28 * 28)  # vlmeval/config.py, the Qwen2-VL models' min/max_pixels
PRESETS = {"vlmevalkit": VLMEVALKIT_QWEN2_VL}


@dataclass(frozen=True)
class ImageSettings:
    """The image pixel bounds an eval runs with: the asked-for ones, clamped to what the visual artifact holds."""

    config: PreprocessConfig  # preprocess.json with the effective bounds
    asked: PreprocessConfig  # with the bounds as asked (what VLMEvalKit would feed)
    note: str = ""  # one line when the bounds were clamped

    def describe(self) -> dict:
        return {"min_pixels": self.config.min_pixels, "max_pixels": self.config.max_pixels,
                "asked_min_pixels": self.asked.min_pixels, "asked_max_pixels": self.asked.max_pixels,
                "clamped": self.note or None}


def image_settings(pipe: VlmPipeline, min_pixels: int | None = None, max_pixels: int | None = None) -> ImageSettings:
    """``--min-pixels``/``--max-pixels`` (default: preprocess.json's), clamped so one image fits the visual
    artifact's N patches."""
    pre, n = pipe.preprocess, pipe.visual_spec.max_patches
    lo, hi = min_pixels or pre.min_pixels, max_pixels or pre.max_pixels
    if not 0 < lo <= hi:
        raise QvlcError(f"--min-pixels {lo} and --max-pixels {hi}", fix="use 0 < --min-pixels <= --max-pixels",
                        key="--min-pixels")
    budget = n * pre.patch_size ** 2
    asked = replace(pre, min_pixels=min(lo, MAX_PIXELS_BOUND), max_pixels=min(hi, MAX_PIXELS_BOUND))
    if hi <= budget:  # each image still fitted to the graph and the prefill window as it runs (``_prepare``)
        return ImageSettings(asked, asked)
    note = (f"--max-pixels {hi} is more than the visual artifact holds: images are resized to at most {budget} pixels "
            f"({n} patches of {pre.patch_size}x{pre.patch_size}; recompile the visual part with a larger "
            "export.max_patches to feed them whole)")
    return ImageSettings(replace(pre, min_pixels=min(lo, budget), max_pixels=budget), asked, note)


def _score(item: Item, text: str) -> tuple[str | None, bool, float | None]:
    if item.multiple_choice:
        letter = extract_option(text, item.options)
        return letter, letter == item.answer, None
    pred, answers = normalize(text), list(item.answers or (item.answer,))
    return pred, any(pred == normalize(a) for a in answers), vqa_score(text, answers)


def _fit(pre: PreprocessConfig, height: int, width: int, most: int) -> PreprocessConfig:
    """``pre`` with bounds under which an image of ``height`` x ``width`` resizes to at most ``most`` pixels (the
    processors' upscaling rounds up, so the lower bound may have to sit below ``most``)."""
    cfg = replace(pre, max_pixels=min(pre.max_pixels, most), min_pixels=min(pre.min_pixels, most))
    for _ in range(64):
        h, w = cfg.resized_size(height, width)
        if h * w <= most or cfg.min_pixels <= 1:
            break
        cfg = replace(cfg, min_pixels=max(1, int(cfg.min_pixels * 0.9)))
    return cfg


def _prepare(pipe: VlmPipeline, item: Item, settings: ImageSettings):
    """The item's prompt with its image at the settings' bounds, shrunk to what the visual graph and the prefill
    window hold together; (prompt, resized: the image is smaller than the asked bounds would make it)."""
    image = [] if item.image is None else [open_image(item.image, what=f"{item.where} image", key="--data")]
    prompt = mcq_prompt(item.question, item.options, item.hint) if item.multiple_choice else vqa_prompt(item.question)
    chat = messages(prompt, bool(image))
    prepared = pipe.prepare_chat(chat, image, preprocess=settings.config)
    if not image:
        return prepared, False
    height, width = image[0].size[::-1]
    pre, unit = settings.config, pipe.visual_spec.merge_unit
    room = pipe.spec.prefill_len - (len(prepared.input_ids) - prepared.image_tokens)  # tokens left for the image
    most = min(pipe.visual_spec.max_patches, max(room, 1) * unit) * pre.patch_size ** 2
    fitted = _fit(pre, height, width, most)
    if fitted != pre:
        prepared = pipe.prepare_chat(chat, image, preprocess=fitted)
    resized = fitted.resized_size(height, width) != settings.asked.resized_size(height, width)
    pipe.check_fits(prepared)
    pipe.check_media(prepared)
    return prepared, resized


def run_eval(pipe: VlmPipeline, items: list[Item], data: str, max_new_tokens: int, reference=None,
             on_item: Callable[[int], None] | None = None, settings: ImageSettings | None = None) -> EvalRun:
    """Every item through the artifacts (and ``reference``, a ``Reference``, when given)."""
    pipe.check_new_tokens(max_new_tokens)
    settings = settings or image_settings(pipe)
    run = EvalRun(data, reference=reference is not None, image_settings=settings.describe())
    for i, item in enumerate(items):
        labels = dict(question=item.question_id, category=item.category, split=item.split,
                      l2_category=item.l2_category, rotated=item.rotated)
        try:
            prepared, resized = _prepare(pipe, item, settings)
        except QvlcError as exc:
            run.predictions.append(Prediction(item.index, answer=item.answer, prediction=None, text="", correct=False,
                                              error=str(exc).splitlines()[0][:300], **labels))
        else:
            result = pipe.generate_prepared(prepared, max_new_tokens)
            pred, ok, vqa = _score(item, result.text)
            p = Prediction(item.index, answer=item.answer, prediction=pred, text=result.text, correct=ok,
                           vision_tokens=prepared.image_tokens, resized=resized, vqa_score=vqa,
                           time_to_first_token=result.time_to_first_token,
                           decode_tokens_per_second=result.decode_tokens_per_second, **labels)
            if reference is not None:
                _, p.reference_text = reference.generate(prepared, max_new_tokens)
                p.reference_prediction, p.reference_correct, p.reference_vqa_score = _score(item, p.reference_text)
            run.predictions.append(p)
        if on_item is not None:
            on_item(i + 1)
    return run


def write_results(path: Path, results: dict) -> None:
    """Atomically: a temporary file beside ``path``, renamed into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(llm_dir: Path, visual_dir: Path, data: Path, out: Path, *, reference: bool = False,
             limit: int | None = None, max_new_tokens: int = 64, checkpoint: Path | None = None,
             trust: Trust = Trust(), min_pixels: int | None = None, max_pixels: int | None = None,
             progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """Read and check everything first (the data file, the output folder, the artifacts, as far as ``trust``
    says), then run and write."""
    if limit is not None and limit < 1:
        raise QvlcError(f"--limit is {limit}", fix="use a positive number of questions", key="--limit")
    if not Path(out).resolve().parent.is_dir():
        raise QvlcError(f"the folder of --out {str(out)!r} does not exist", fix="create it, or pass another --out",
                        key="--out")
    items = read_items(data, limit)
    pipe = VlmPipeline(llm_dir, visual_dir, checkpoint=checkpoint, trust=trust)
    settings = image_settings(pipe, min_pixels, max_pixels)
    room = pipe.spec.max_context - pipe.spec.prefill_len
    ref = None
    if reference:
        from qvlc.eval.reference import Reference

        ref = Reference(pipe)
    tick = progress(len(items)) if progress is not None else None
    results = summary(run_eval(pipe, items, str(data), min(max_new_tokens, room), ref, tick, settings))
    write_results(out, results)
    return results
