"""Benchmark files as VLMEvalKit and evalscope keep them offline, read into ``Item``s.

- Multiple choice, the TSV layout of MMBench, MMStar, SEED-Bench: ``index``, ``question``, optional ``hint``, the
  options ``A``, ``B``, … (empty = absent), ``answer`` (a letter), ``image`` (base64; a short value is the
  ``index`` of the row whose image it reuses, as MMBench's circular copies do), optional ``category``.
- Open VQA, JSONL: one ``{"image": …, "question": …, "answer": …}`` object a line (optional ``index``,
  ``category``); ``image`` is a data URL, bare base64, or a path relative to the file's folder (never outside it).

Every problem is a ``QvlcError`` naming the file, the line and the column (exit 2), raised before anything runs.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from qvlc.errors import QvlcError

MAX_FIELD = 64 << 20  # one TSV field (a base64 image) at most
IMAGE_REF_MAX = 64  # MMBench: an image field this short names another row's index
CIRCULAR = 1_000_000  # MMBench's rotated copies of question q have indices q + k * 1e6 (VLMEvalKit's g_index)


@dataclass(frozen=True)
class Item:
    index: str
    question: str
    answer: str
    image: bytes | None  # encoded image bytes (decoded, bounded, when the item runs)
    options: dict[str, str]  # letter → option text; empty for open VQA
    hint: str | None = None
    category: str = ""
    where: str = ""  # file:line, for messages
    split: str = ""
    l2_category: str = ""
    answers: tuple[str, ...] = ()  # open VQA: every reference answer (VQA score); ``answer`` is the first

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def question_id(self) -> str:
        return question_of(self.index)

    @property
    def rotated(self) -> bool:
        """A circular copy (options rotated) of another row's question."""
        return self.question_id != self.index.strip()


def question_of(index: str) -> str:
    """The question a row asks: its index modulo 1e6 for integer indices (a circular copy's is its original's,
    VLMEvalKit's ``g_index``), else the index itself."""
    index = str(index).strip()
    return str(int(index) % CIRCULAR) if index.lstrip("-").isdigit() else index


def whole_questions(indices: list[str], limit: int | None) -> set[str]:
    """The first ``limit`` questions in file order (all of them without a limit)."""
    keep: dict[str, None] = {}
    for index in indices:
        if not limit or len(keep) < limit:
            keep.setdefault(question_of(index))
    return set(keep)


def _error(path: Path, line: int, column: str, problem: str, fix: str) -> QvlcError:
    return QvlcError(f"{path}, line {line}, column {column!r}: {problem}", fix=fix, key="--data")


def read_items(path: Path, limit: int | None = None) -> list[Item]:
    """The items of a .tsv (multiple choice) or .jsonl (open VQA) file, in file order (the first ``limit``)."""
    path = Path(path)
    if not path.is_file():
        raise QvlcError(f"{str(path)!r} is not a file", fix="pass --data a .tsv (MMBench layout) or .jsonl file",
                        key="--data")
    if path.suffix.lower() == ".tsv":
        items = _read_tsv(path, limit)
    elif path.suffix.lower() in (".jsonl", ".json"):
        items = _read_jsonl(path, limit)
    else:
        raise QvlcError(f"{path.name}: unknown benchmark format {path.suffix!r}",
                        fix="use a .tsv in the MMBench layout or a .jsonl of {image, question, answer}", key="--data")
    if not items:
        raise QvlcError(f"{path} holds no items", fix="pass a benchmark file with at least one row", key="--data")
    return items


def _b64(path: Path, line: int, column: str, value: str) -> bytes:
    value = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _error(path, line, column, f"the base64 cannot be decoded ({exc})",
                     "store the image as base64 of its encoded bytes (PNG, JPEG)") from None


def _read_tsv(path: Path, limit: int | None) -> list[Item]:
    csv.field_size_limit(min(MAX_FIELD, sys.maxsize))
    with open(path, newline="", encoding="utf-8") as f:
        try:
            rows = list(csv.DictReader(f, delimiter="\t"))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise _error(path, getattr(exc, "line_num", 0) or 0, "", f"not a readable TSV ({exc})",
                         "write the file as tab-separated values, UTF-8") from None
        header = rows[0].keys() if rows else []
    for col in ("index", "question", "answer", "image"):
        if col not in header:
            raise _error(path, 1, col, "the column is missing",
                         "use the MMBench layout: index, question, [hint,] A, B, …, answer, image")
    by_index = {r["index"]: r for r in rows}
    items = []
    questions = whole_questions([r["index"] or "" for r in rows], limit)  # --limit N: N questions, every rotation
    for n, row in enumerate(rows, start=2):
        if question_of(row["index"] or "") not in questions:
            continue
        options = {c: row[c] for c in string.ascii_uppercase if (row.get(c) or "").strip()}
        if not (row["question"] or "").strip():
            raise _error(path, n, "question", "the question is empty", "every row needs a question")
        if len(options) < 2:
            raise _error(path, n, "A", f"{len(options)} option(s)", "a multiple-choice row needs options A, B, …")
        answer = (row["answer"] or "").strip()
        if answer not in options:
            raise _error(path, n, "answer", f"{answer[:20]!r} is not one of the options {sorted(options)}",
                         "the answer is the letter of the right option")
        image = (row["image"] or "").strip()
        if len(image) <= IMAGE_REF_MAX:
            if image not in by_index or len(by_index[image]["image"] or "") <= IMAGE_REF_MAX:
                raise _error(path, n, "image", f"{image!r} is neither base64 nor the index of a row with an image",
                             "store the image as base64, or the index of the row whose image this row reuses")
            image = by_index[image]["image"]
        items.append(Item(row["index"], row["question"], answer, _b64(path, n, "image", image), options,
                          (row.get("hint") or "").strip() or None, (row.get("category") or "").strip(),
                          f"{path.name}:{n}", (row.get("split") or "").strip(),
                          (row.get("l2-category") or "").strip()))
    return items


def _jsonl_image(path: Path, line: int, value) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _error(path, line, "image", "not a string", "give a path, a data URL or base64")
    if value.startswith("data:") or len(value) > 1024:
        return _b64(path, line, "image", value)
    root = path.parent.resolve()
    target = (root / value).resolve()
    if root not in target.parents or not target.is_file():
        raise _error(path, line, "image", f"{value[:80]!r} is not a file inside {root}",
                     "give a path relative to the JSONL file's folder (or inline the image as a data URL)")
    return target.read_bytes()


def _answers(path: Path, line: int, value) -> tuple[str, ...]:
    """A JSONL answer: one string or number, or a list of them (VQA's reference answers)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip()
                             for v in values):
        raise _error(path, line, "answer", "missing, empty, or not a string, a number or a list of them",
                     'every line needs an "answer" (or a list of answers)')
    return tuple(str(v) for v in values)


def _read_jsonl(path: Path, limit: int | None) -> list[Item]:
    items = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _error(path, n, f"byte {exc.start}", f"not UTF-8 ({exc.reason})", "write the file as UTF-8") \
                    from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _error(path, n, f"char {exc.colno}", f"not JSON ({exc.msg})", "one JSON object a line") from None
            except RecursionError:
                raise _error(path, n, "", "JSON nested too deeply", "one flat JSON object a line") from None
            if not isinstance(rec, dict):
                raise _error(path, n, "", "not a JSON object", 'write {"image": …, "question": …, "answer": …}')
            if not isinstance(rec.get("question"), (str, int, float)) or not str(rec["question"]).strip():
                raise _error(path, n, "question", "missing or empty", 'every line needs a "question"')
            answers = _answers(path, n, rec.get("answer"))
            items.append(Item(str(rec.get("index", len(items))), str(rec["question"]), answers[0],
                              _jsonl_image(path, n, rec.get("image")), {}, None, str(rec.get("category", "")),
                              f"{path.name}:{n}", str(rec.get("split", "")), str(rec.get("l2-category", "")),
                              answers))
    questions = whole_questions([i.index for i in items], limit)
    return [i for i in items if i.question_id in questions]
