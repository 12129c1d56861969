"""``embed_tokens.bin``: the token embedding table, raw row-major [vocab, hidden], little-endian."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

NP_DTYPES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}


def write_embed_table(table: np.ndarray, path: Path, dtype: str, chunk_rows: int = 8192) -> int:
    """Write ``table`` (float32 [vocab, hidden]) cast to ``dtype``; returns bytes written.

    Rows are cast and written in chunks so a 150k-row table never needs a second full-size buffer.
    """
    target = NP_DTYPES[dtype]
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

    def __init__(self, path: Path, vocab: int, hidden: int, dtype: str) -> None:
        self.dtype = NP_DTYPES[dtype]
        expected = vocab * hidden * self.dtype.itemsize
        size = Path(path).stat().st_size
        if size != expected:
            raise ValueError(f"{path} holds {size} bytes, expected {expected} for [{vocab}, {hidden}] {dtype}")
        self.table = np.memmap(path, dtype=self.dtype, mode="r", shape=(vocab, hidden))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """[n] token ids → [n, hidden] rows in the table's dtype."""
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)])

    def embed(self, ids: np.ndarray, image_token: int | None = None,
              image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Rows for ``ids``, with the rows of ``image_embeds`` scattered into the image-pad positions in order."""
        out = self.lookup(ids)
        if image_embeds is not None and image_token is not None:
            where = np.flatnonzero(np.asarray(ids) == image_token)
            if len(where) != len(image_embeds):
                raise ValueError(f"{len(where)} image-pad tokens but {len(image_embeds)} image embedding rows")
            out[where] = image_embeds.astype(out.dtype)
        return out
