"""``embed_tokens.bin``: the token embedding table, raw row-major [vocab, hidden], little-endian."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qvlc.errors import QvlcError
from qvlc.precision import Precision


def write_embed_table(table: np.ndarray, path: Path, dtype: Precision, chunk_rows: int = 8192) -> int:
    """Write ``table`` (float32 [vocab, hidden]) cast to ``dtype``; returns bytes written.

    Rows are cast and written in chunks so a 150k-row table never needs a second full-size buffer.
    """
    target = Precision(dtype).numpy
    written = 0
    with open(path, "wb") as f:
        for start in range(0, table.shape[0], chunk_rows):
            block = np.ascontiguousarray(table[start:start + chunk_rows], dtype=np.float32).astype(target)
            f.write(block.tobytes())
            written += block.nbytes
        f.flush()
        os.fsync(f.fileno())
    return written


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

    def deepstack(self, ids: np.ndarray, rows: dict[int, np.ndarray | None], layers: int) -> np.ndarray:
        """The dense DeepStack input ``[layers, 1, n, hidden]``: each token's ``[layers, k, hidden]`` rows scattered
        into its positions in order (as ``embed`` scatters the vision rows), zeros everywhere else."""
        out = np.zeros((layers, 1, len(ids), self.table.shape[1]), dtype=self.table.dtype)
        for token, feats in rows.items():
            if feats is not None:
                where = np.flatnonzero(np.asarray(ids) == token)
                if feats.shape[:2] != (layers, len(where)):
                    raise QvlcError(f"{feats.shape[1]} DeepStack rows in {feats.shape[0]} layers for {len(where)} pad "
                                    f"tokens of id {token} and {layers} layers", key="input_ids",
                                    fix="expand each image/video pad to t*h*w/merge² tokens of its grid")
                out[:, 0, where] = feats.astype(out.dtype)
        return out

    def embed(self, ids: np.ndarray, rows: dict[int, np.ndarray | None] | None = None) -> np.ndarray:
        """Rows for ``ids``; for each ``token: embeds`` in ``rows`` (image pad, video pad), the rows of ``embeds``
        are scattered into that token's positions in order."""
        out = self.lookup(ids)
        for token, embeds in (rows or {}).items():
            if embeds is None:
                continue
            where = np.flatnonzero(np.asarray(ids) == token)
            if len(where) != len(embeds):
                raise QvlcError(f"the prompt has {len(where)} pad tokens of id {token} but {len(embeds)} vision "
                                "embedding rows were given for them",
                                fix="expand each image/video pad to t*h*w/merge² tokens of its grid", key="input_ids")
            out[where] = embeds.astype(out.dtype)
        return out
