"""The manifest stage takes the digests the export computed while writing, and reads a file only when it changed
since: the weights files and embed_tokens.bin are not read back."""

from __future__ import annotations

import json
import os

import numpy as np

from qvlc.artifact.hashing import FileDigest, HashingWriter, sha256_file
from qvlc.artifact.manifest import file_table
from qvlc.host.embeddings import write_embed_table
from qvlc.precision import Precision


def test_a_written_digest_is_the_files_sha256(tmp_path):
    with HashingWriter(tmp_path / "w.data") as f:
        for k in range(5):
            f.write(bytes([k]) * (1000 + k))
    assert f.digest.sha256 == sha256_file(tmp_path / "w.data") and f.digest.size == 5010
    d = write_embed_table(np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32),
                          tmp_path / "e.bin", Precision.FP16, chunk_rows=64)
    assert d.sha256 == sha256_file(tmp_path / "e.bin") and d.size == 300 * 8 * 2


def test_file_table_trusts_a_digest_only_while_the_file_is_unchanged(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a" * 100)
    (tmp_path / "b.bin").write_bytes(b"b" * 100)
    st = (tmp_path / "a.bin").stat()
    planted = {"a.bin": FileDigest(st.st_size, st.st_mtime_ns, "f" * 64)}  # not the bytes' digest: shows it is used
    rows = {r.path: r.sha256 for r in file_table(tmp_path, planted)}
    assert rows == {"a.bin": "f" * 64, "b.bin": sha256_file(tmp_path / "b.bin")}
    (tmp_path / "a.bin").write_bytes(b"A" * 100)  # same size, rewritten: a new modification time
    os.utime(tmp_path / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert {r.path: r.sha256 for r in file_table(tmp_path, planted)}["a.bin"] == sha256_file(tmp_path / "a.bin")


def test_compiled_artifact_lists_the_bytes_on_disk(compiled):
    r = compiled("llm_fp32_tp2_digests", prefill_len=64, max_context=128, tp=2, validate={"enabled": False})
    assert set(r.export.written) == {"embed_tokens.bin", "rank0/llm_weights.data", "rank1/llm_weights.data"}
    files = {f["path"]: f["sha256"] for f in json.loads((r.folder / "manifest.json").read_text())["files"]}
    for rel, digest in r.export.written.items():
        assert files[rel] == digest.sha256 == sha256_file(r.folder / rel)
