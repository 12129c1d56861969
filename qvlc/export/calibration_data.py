"""The calibration set of ``export.weights.method: gptq``: read, tokenized and cut into windows at check time, so a
bad file is refused before any weight is read.

``calibration.path`` is a JSON array or a JSONL file (one record per line), the shape a vamc ``dataset.path``
points to. A record is a string, ``{"text": ...}`` (tokenized with the checkpoint's own tokenizer) or
``{"input_ids": [...]}`` (already tokenized). The records' tokens are concatenated into one stream and
``nsamples`` windows of ``seqlen`` tokens are taken at offsets drawn with a fixed seed (as AutoGPTQ's examples
sample wikitext), so the same file gives the same windows, hence the same integers. Without a path the built-in
set (``calibration_texts``) is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvlc.checkpoint.tokenizer import has_tokenizer
from qvlc.errors import CheckpointError, ConfigError

KEY = "export.weights.calibration"
SEED = 0


@dataclass(frozen=True)
class CalibrationSet:
    windows: np.ndarray  # int64 [nsamples, seqlen]
    source: str  # the file, or "the built-in set"
    set_tokens: int  # tokens in the whole set (windows overlap when nsamples × seqlen exceeds it)


def _records(path: Path) -> list:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the calibration set {path}: {exc}", fix="point calibration.path at a "
                          "readable JSON or JSONL file of texts", key=f"{KEY}.path") from exc
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in raw.splitlines() if line.strip()]
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid {'JSONL' if path.suffix == '.jsonl' else 'JSON'}: {exc}",
                          fix="write a JSON array of texts, or JSONL with one text (or {\"text\": ...}) per line",
                          key=f"{KEY}.path") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an array of records",
                          fix="write a JSON array of texts (or name the file .jsonl for one record per line)",
                          key=f"{KEY}.path")
    return data


def _tokenize(records: list, folder: Path, where: str) -> list[list[int]]:
    texts = [(i, r if isinstance(r, str) else r.get("text")) for i, r in enumerate(records)
             if isinstance(r, str) or isinstance(r, dict) and "text" in r]
    ids: dict[int, list[int]] = {}
    if texts:
        if not has_tokenizer(folder):
            raise CheckpointError(f"the calibration texts ({where}) are tokenized with the checkpoint's tokenizer, "
                                  f"and {folder} has none (tokenizer.json, or vocab.json + merges.txt)",
                                  fix="copy the tokenizer files of the original download into the checkpoint "
                                      "folder, or give calibration.path records of {\"input_ids\": [...]}",
                                  key=f"{KEY}.path")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        for i, t in texts:
            if not isinstance(t, str):
                raise ConfigError(f"{where}: record {i} has a text that is not a string", fix="write "
                                  "{\"text\": \"...\"}", key=f"{KEY}.path")
            ids[i] = tok(t)["input_ids"]
    for i, r in enumerate(records):
        if i in ids:
            continue
        seq = r.get("input_ids") if isinstance(r, dict) else None
        if not (isinstance(seq, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in seq)):
            raise ConfigError(f"{where}: record {i} is neither a text nor {{\"input_ids\": [integers]}}: "
                              f"{str(r)[:80]}", fix="write each record as a string, {\"text\": ...} or "
                              "{\"input_ids\": [...]}", key=f"{KEY}.path")
        ids[i] = seq
    return [ids[i] for i in range(len(records))]


def calibration_set(cfg, folder: Path, vocab: int) -> CalibrationSet:
    """The windows of ``export.weights.calibration``, checked against the checkpoint's tokenizer and vocabulary."""
    c = cfg.export.weights.calibration
    if c.path:
        path = Path(c.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"the calibration set {path} does not exist", fix="point calibration.path at a JSON "
                              "or JSONL file of texts, or remove it for the built-in set", key=f"{KEY}.path")
        records, source = _records(path), str(path)
    else:
        from qvlc.export.calibration_texts import TEXTS

        records, source = list(TEXTS), "the built-in set"
    stream = np.asarray([t for seq in _tokenize(records, folder, source) for t in seq], dtype=np.int64)
    if len(stream) < c.seqlen:
        raise ConfigError(f"the calibration set ({source}) has {len(stream)} tokens, fewer than one window of "
                          f"seqlen {c.seqlen}", fix=f"add texts, or lower {KEY}.seqlen", key=f"{KEY}.seqlen")
    bad = stream[(stream < 0) | (stream >= vocab)]
    if len(bad):
        raise ConfigError(f"the calibration set ({source}) has token id {int(bad[0])}, outside the model's vocabulary "
                          f"of {vocab}", fix="tokenize with this checkpoint's tokenizer", key=f"{KEY}.path")
    starts = np.random.default_rng(SEED).integers(0, len(stream) - c.seqlen + 1, c.nsamples)
    return CalibrationSet(np.stack([stream[s:s + c.seqlen] for s in starts]), source, len(stream))
