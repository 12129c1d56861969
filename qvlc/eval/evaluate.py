"""``qvlc eval``: a benchmark through the artifacts — and, with ``--reference``, through the original model — scored
the way VLMEvalKit scores it, with where the two disagree.

Every item runs greedy through ``VlmPipeline`` (the ``qvlc run`` path); an item the artifacts cannot take (a prompt
longer than the prefill window, an image over N patches) is scored wrong with its reason, never aborting the run.
``results.json`` is written once, at the end, through a temporary file: an interrupted eval leaves nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qvlc.artifact.trust import Trust
from qvlc.errors import QvlcError
from qvlc.eval.bench_data import Item, read_items
from qvlc.eval.scoring import (
    extract_option,
    mcq_prompt,
    messages,
    normalize,
    vqa_prompt,
)
from qvlc.runtime.media import open_image
from qvlc.runtime.vlm import VlmPipeline


@dataclass
class Prediction:
    index: str
    answer: str
    prediction: str | None  # the option letter (multiple choice) or the normalised text (open VQA)
    text: str
    correct: bool
    category: str = ""
    reference_prediction: str | None = None
    reference_text: str | None = None
    reference_correct: bool | None = None
    error: str | None = None  # why the artifacts could not take the item
    time_to_first_token: float | None = None
    decode_tokens_per_second: float | None = None


@dataclass
class EvalRun:
    data: str
    predictions: list[Prediction] = field(default_factory=list)
    reference: bool = False


def _score(item: Item, text: str) -> tuple[str | None, bool]:
    if item.multiple_choice:
        letter = extract_option(text, item.options)
        return letter, letter == item.answer
    pred = normalize(text)
    return pred, pred == normalize(item.answer)


def _prepare(pipe: VlmPipeline, item: Item):
    image = [] if item.image is None else [open_image(item.image, what=f"{item.where} image", key="--data")]
    prompt = mcq_prompt(item.question, item.options, item.hint) if item.multiple_choice else vqa_prompt(item.question)
    prepared = pipe.prepare_chat(messages(prompt, bool(image)), image)
    pipe.check_fits(prepared)
    pipe.check_media(prepared)
    return prepared


def run_eval(pipe: VlmPipeline, items: list[Item], data: str, max_new_tokens: int, reference=None,
             on_item: Callable[[int], None] | None = None) -> EvalRun:
    """Every item through the artifacts (and ``reference``, a ``Reference``, when given)."""
    pipe.check_new_tokens(max_new_tokens)
    run = EvalRun(data, reference=reference is not None)
    for i, item in enumerate(items):
        try:
            prepared = _prepare(pipe, item)
        except QvlcError as exc:
            run.predictions.append(Prediction(item.index, item.answer, None, "", False, item.category,
                                              error=str(exc).splitlines()[0][:300]))
        else:
            result = pipe.generate_prepared(prepared, max_new_tokens)
            pred, ok = _score(item, result.text)
            p = Prediction(item.index, item.answer, pred, result.text, ok, item.category,
                           time_to_first_token=result.time_to_first_token,
                           decode_tokens_per_second=result.decode_tokens_per_second)
            if reference is not None:
                _, p.reference_text = reference.generate(prepared, max_new_tokens)
                p.reference_prediction, p.reference_correct = _score(item, p.reference_text)
            run.predictions.append(p)
        if on_item is not None:
            on_item(i + 1)
    return run


def _accuracy(ps: list[Prediction], attr: str = "correct") -> float:
    return sum(bool(getattr(p, attr)) for p in ps) / len(ps) if ps else 0.0


def summary(run: EvalRun) -> dict:
    """results.json's content: totals, per-category accuracy, speed, and one prediction per item."""
    ps = run.predictions
    cats = sorted({p.category for p in ps})
    out: dict = {"data": run.data, "items": len(ps), "accuracy": _accuracy(ps), "reference_accuracy": None,
                 "agreement": None, "errors": sum(p.error is not None for p in ps)}
    if run.reference:
        ran = [p for p in ps if p.error is None]
        out["reference_accuracy"] = _accuracy(ran, "reference_correct") * len(ran) / len(ps) if ps else 0.0
        same = [p for p in ran if p.prediction == p.reference_prediction]
        out["agreement"] = len(same) / len(ran) if ran else 1.0
        out["disagreements"] = [p.index for p in ran if p.prediction != p.reference_prediction]
        out["text_agreement"] = sum(p.text == p.reference_text for p in ran) / len(ran) if ran else 1.0
    out["per_category"] = {c or "all": {"items": len(g), "accuracy": _accuracy(g),
                                        **({"reference_accuracy": _accuracy(g, "reference_correct")}
                                           if run.reference else {})}
                           for c in cats for g in [[p for p in ps if p.category == c]]}
    ttft = [p.time_to_first_token for p in ps if p.time_to_first_token is not None]
    tps = [p.decode_tokens_per_second for p in ps if p.decode_tokens_per_second]
    out["time_to_first_token_s"] = {"median": statistics.median(ttft) if ttft else None,
                                    "mean": statistics.fmean(ttft) if ttft else None}
    out["decode_tokens_per_second"] = {"median": statistics.median(tps) if tps else None}
    out["predictions"] = [{k: v for k, v in asdict(p).items() if run.reference or not k.startswith("reference")}
                          for p in ps]
    return out


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
             trust: Trust = Trust(), progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """Read and check everything first (the data file, the output folder, the artifacts, as far as ``trust``
    says), then run and write."""
    if limit is not None and limit < 1:
        raise QvlcError(f"--limit is {limit}", fix="use a positive number of items", key="--limit")
    if not Path(out).resolve().parent.is_dir():
        raise QvlcError(f"the folder of --out {str(out)!r} does not exist", fix="create it, or pass another --out",
                        key="--out")
    items = read_items(data, limit)
    pipe = VlmPipeline(llm_dir, visual_dir, checkpoint=checkpoint, trust=trust)
    room = pipe.spec.max_context - pipe.spec.prefill_len
    ref = None
    if reference:
        from qvlc.eval.reference import Reference

        ref = Reference(pipe)
    tick = progress(len(items)) if progress is not None else None
    results = summary(run_eval(pipe, items, str(data), min(max_new_tokens, room), ref, tick))
    write_results(out, results)
    return results
