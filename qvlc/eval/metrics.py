"""results.json's figures, as VLMEvalKit reports them.

- MMBench-layout files whose rows include circular copies (index ``q + k·1e6`` asks question ``q`` with its options
  rotated): ``accuracy`` is CircularEval (VLMEvalKit ``mcq_circular_eval``): a question counts only when every one
  of its rows is answered right, ``metric: "circular"``; beside it ``vanilla_0_accuracy`` (the original rows only)
  and ``vanilla_all_accuracy`` (every row). Files without copies: ``metric: "vanilla"``, one row one question.
- Per ``split`` (VLMEvalKit's Overall per split), ``l2-category`` and ``category``, over unique questions (a
  question's labels are its original row's), as ``report_acc`` does.
- The reference model gets the same figures; ``agreement`` compares the option each side's answer names, per row,
  and ``question_agreement`` whether each question is scored the same.
- Open VQA: ``accuracy`` is exact match after normalisation; ``vqa_score`` is VQA's score over the item's answers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from qvlc.eval.scoring import MATCHING


@dataclass
class Prediction:
    index: str
    question: str  # the question this row asks (a circular copy's is its original's index)
    answer: str
    prediction: str | None  # the option letter (multiple choice) or the normalised text (open VQA)
    text: str
    correct: bool
    category: str = ""
    split: str = ""
    l2_category: str = ""
    rotated: bool = False
    vision_tokens: int = 0
    resized: bool = False  # the image was shrunk to what the artifacts hold
    vqa_score: float | None = None
    reference_prediction: str | None = None
    reference_text: str | None = None
    reference_correct: bool | None = None
    reference_vqa_score: float | None = None
    error: str | None = None  # why the artifacts could not take the item
    time_to_first_token: float | None = None
    decode_tokens_per_second: float | None = None


@dataclass
class EvalRun:
    data: str
    predictions: list[Prediction] = field(default_factory=list)
    reference: bool = False
    image_settings: dict = field(default_factory=dict)


def _mean(xs: list) -> float:
    return sum(bool(x) for x in xs) / len(xs) if xs else 0.0


def questions(ps: list[Prediction]) -> dict[str, list[Prediction]]:
    """Rows by the question they ask, in file order."""
    out: dict[str, list[Prediction]] = {}
    for p in ps:
        out.setdefault(p.question, []).append(p)
    return out


def question_hits(groups: dict[str, list[Prediction]], attr: str) -> dict[str, bool]:
    """CircularEval: a question is right when every row asking it is (one row: vanilla)."""
    return {q: all(bool(getattr(p, attr)) for p in rows) for q, rows in groups.items()}


def _main_row(rows: list[Prediction]) -> Prediction:
    return next((p for p in rows if not p.rotated), rows[0])


def breakdown(groups: dict[str, list[Prediction]], hits: dict[str, dict[str, bool]], label: Callable) -> dict:
    """Accuracy per label value (split, l2-category, category) over unique questions, for each side in ``hits``."""
    by: dict[str, list[str]] = {}
    for q, rows in groups.items():
        by.setdefault(label(_main_row(rows)) or "none", []).append(q)
    return {name: {"questions": len(qs), **{key: _mean([h[q] for q in qs]) for key, h in hits.items()}}
            for name, qs in sorted(by.items())}


def summary(run: EvalRun) -> dict:
    """results.json's content: the metric and its figures, the breakdowns, speed, and one prediction per row."""
    ps = run.predictions
    groups = questions(ps)
    circular = any(p.rotated for p in ps)
    hits = {"accuracy": question_hits(groups, "correct")}
    if run.reference:
        hits["reference_accuracy"] = question_hits(groups, "reference_correct")
    out: dict = {"data": run.data, "metric": "circular" if circular else "vanilla", "answer_extraction": MATCHING,
                 "questions": len(groups), "items": len(ps), "accuracy": _mean(list(hits["accuracy"].values())),
                 "vanilla_0_accuracy": _mean([p.correct for p in ps if not p.rotated]),
                 "vanilla_all_accuracy": _mean([p.correct for p in ps]),
                 "errors": sum(p.error is not None for p in ps), "resized": sum(p.resized for p in ps),
                 "image_settings": run.image_settings}
    if any(p.vqa_score is not None for p in ps):
        out["vqa_score"] = statistics.fmean(p.vqa_score or 0.0 for p in ps)
    if run.reference:
        ran = [p for p in ps if p.error is None]
        out["reference_accuracy"] = _mean(list(hits["reference_accuracy"].values()))
        out["reference_vanilla_0_accuracy"] = _mean([p.reference_correct for p in ps if not p.rotated])
        out["reference_vanilla_all_accuracy"] = _mean([p.reference_correct for p in ps])
        if "vqa_score" in out:
            out["reference_vqa_score"] = statistics.fmean(p.reference_vqa_score or 0.0 for p in ps)
        out["agreement"] = _mean([p.prediction == p.reference_prediction for p in ran]) if ran else 1.0
        out["question_agreement"] = _mean([hits["accuracy"][q] == hits["reference_accuracy"][q] for q in groups])
        out["disagreements"] = [p.index for p in ran if p.prediction != p.reference_prediction]
        out["text_agreement"] = _mean([p.text == p.reference_text for p in ran]) if ran else 1.0
    out["by_split"] = breakdown(groups, hits, lambda p: p.split)
    out["by_l2_category"] = breakdown(groups, hits, lambda p: p.l2_category)
    out["by_category"] = breakdown(groups, hits, lambda p: p.category)
    ttft = [p.time_to_first_token for p in ps if p.time_to_first_token is not None]
    tps = [p.decode_tokens_per_second for p in ps if p.decode_tokens_per_second]
    out["time_to_first_token_s"] = {"median": statistics.median(ttft) if ttft else None,
                                    "mean": statistics.fmean(ttft) if ttft else None}
    out["decode_tokens_per_second"] = {"median": statistics.median(tps) if tps else None}
    out["predictions"] = [{k: v for k, v in asdict(p).items() if run.reference or not k.startswith("reference")}
                          for p in ps]
    return out
