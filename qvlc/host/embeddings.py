"""``embed_tokens.bin``: the token embedding table, raw row-major [vocab, hidden], little-endian."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qvlc.artifact.hashing import FileDigest, HashingWriter
from qvlc.errors import QvlcError
from qvlc.precision import Precision


def write_embed_table(table: np.ndarray, path: Path, dtype: Precision, chunk_rows: int = 8192) -> FileDigest:
    """Write ``table`` (float32 [vocab, hidden]) cast to ``dtype``; returns the file's digest (its size: the bytes
    written), taken from the bytes as they were written.

    Rows are cast and written in chunks so a 150k-row table never needs a second full-size buffer.
    """
    target = Precision(dtype).numpy
    with HashingWriter(path) as f:
        for start in range(0, table.shape[0], chunk_rows):
            block = np.ascontiguousarray(table[start:start + chunk_rows], dtype=np.float32).astype(target)
            f.write(block.tobytes())
    return f.close()


class EmbedTable:
    """Memory-mapped ``embed_tokens.bin``: look rows up without reading the table into memory."""

    def __init__(self, path: Path, vocab: int, hidden: int, dtype: Precision) -> None:
        self.dtype = Precision(dtype).numpy
        expected = vocab * hidden * self.dtype.itemsize
        size = Path(path).stat().st_size if Path(path).is_file() else -1
        if size != expected:
            raise QvlcError(f"{path} holds {max(size, 0)} bytes, expected {expected} for [{vocab}, {hidden}] {dtype}",
                            fix="the artifact is incomplete or damaged: run `qvlc verify` on it, or recompile",
                            key=str(path))
        self.table = np.memmap(path, dtype=self.dtype, mode="r", shape=(vocab, hidden))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """[n] token ids → [n, hidden] rows in the table's dtype."""
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)])

    def embed(self, ids: np.ndarray, rows: dict[int, np.ndarray | None] | None = None) -> np.ndarray:
        """Rows for ``ids``; for each ``token: embeds`` in ``rows`` (image pad, video pad), the rows of ``embeds``
        are scattered into that token's positions in order."""
        return scatter_rows(self.lookup(ids), ids, rows or {})


def scatter_rows(out: np.ndarray, ids: np.ndarray, rows: dict[int, np.ndarray | None]) -> np.ndarray:
    """For each ``token: r`` in ``rows`` (image pad, video pad), ``r``'s rows into ``out`` at that token's positions
    of ``ids``, in order (``out`` is indexed by position on its first axis); the vision embedding and DeepStack
    scatter alike. QvlcError when a token's positions and rows differ in number."""
    for token, r in rows.items():
        if r is None:
            continue
        where = np.flatnonzero(np.asarray(ids) == token)
        if len(where) != len(r):
            raise QvlcError(f"the prompt has {len(where)} pad tokens of id {token} but {len(r)} vision rows were "
                            "given for them", fix="expand each image/video pad to t*h*w/merge² tokens of its grid",
                            key="input_ids")
        out[where] = r.astype(out.dtype)
    return out


def dense_deepstack(ids: np.ndarray, rows: dict[int, np.ndarray | None], layers: int, hidden: int,
                    dtype: np.dtype) -> np.ndarray:
    """The dense DeepStack input ``[layers, 1, n, hidden]``: each pad token's ``[layers, k, hidden]`` rows scattered
    into its positions (``scatter_rows``), zeros everywhere else."""
    by_position = {t: None if r is None else np.swapaxes(r, 0, 1) for t, r in rows.items()}  # [k, layers, hidden]
    for t, r in by_position.items():
        if r is not None and r.shape[1] != layers:
            raise QvlcError(f"DeepStack rows of pad token {t} come in {r.shape[1]} layers, the LLM takes {layers}",
                            fix="compile both parts from the same model.checkpoint", key="input_ids")
    out = scatter_rows(np.zeros((len(ids), layers, hidden), dtype=dtype), ids, by_position)
    return np.ascontiguousarray(np.swapaxes(out, 0, 1)[:, None])
