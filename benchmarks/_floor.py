"""What the hardware allows: rates measured on this machine, and the floor of each compile stage from them.

A stage's floor is the larger of its arithmetic at the measured GEMM rate and its bytes at the measured rate of
the medium they come from (disk, memory, the hash). It counts only work the stage cannot avoid: the FLOPs of the
matrix products (the element-wise work, casts and Python around them are what a measured stage spends above it),
reading the weights once, writing the artifact once. The benchmarks print it beside each measured stage.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _median_seconds(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Rates:
    gemm_gflops: float  # fp32 matrix product, every core (torch, the oracle's and ORT's precision on CPU)
    memory_gbps: float  # reading memory (a 1 GiB fp32 reduction)
    disk_read_mbps: float  # reading a file not in the page cache
    disk_write_mbps: float  # writing a file and syncing it
    sha256_mbps: float

    @staticmethod
    def measure(probe: Path, workdir: Path) -> Rates:
        """``probe``: a large file to read after dropping it from the page cache (a checkpoint shard)."""
        import torch

        a, b = torch.randn(2048, 1536), torch.randn(1536, 8960)
        gemm = 2 * 2048 * 1536 * 8960 / _median_seconds(lambda: a @ b) / 1e9
        big = np.ones(1 << 28, dtype=np.float32)
        memory = big.nbytes / _median_seconds(big.sum) / 1e9
        del big
        buf = os.urandom(1 << 26)
        sha = len(buf) * 4 / _median_seconds(lambda: [hashlib.sha256(buf).digest() for _ in range(4)], 3) / 1e6
        return Rates(gemm, memory, _read_rate(probe), _write_rate(workdir), sha)

    def line(self) -> str:
        return (f"rates measured here: GEMM {self.gemm_gflops:.0f} GFLOP/s (fp32, {os.cpu_count()} cores), "
                f"memory {self.memory_gbps:.1f} GB/s, disk read {self.disk_read_mbps:.0f} MB/s, "
                f"disk write {self.disk_write_mbps:.0f} MB/s, sha256 {self.sha256_mbps:.0f} MB/s")


def _read_rate(path: Path, limit: int = 2 << 30) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop its clean pages: the read comes from the disk
        buf, done = bytearray(16 << 20), 0
        t0 = time.perf_counter()
        while done < limit and (n := os.readv(fd, [buf])):
            done += n
        return done / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)


def _write_rate(workdir: Path, size: int = 1 << 30) -> float:
    path = workdir / ".write_probe"
    buf = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(buf)):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return size / seconds / 1e6


@dataclass(frozen=True)
class Floor:
    seconds: float
    basis: str


def _floor(flops: float, byte_terms: list[tuple[float, float, str]], rates: Rates, what: str) -> Floor:
    """max(flops at the GEMM rate, each (bytes, MB/s) term) — the hardware can overlap them, no better."""
    terms = [(flops / rates.gemm_gflops / 1e9, f"{flops / 1e12:.1f} TFLOP")] if flops else []
    terms += [(b / (r * 1e6), f"{b / 1e9:.1f} GB {name}") for b, r, name in byte_terms]
    seconds = max((t for t, _ in terms), default=0.0)  # nothing to do (no image among the cases): 0
    return Floor(seconds, f"{what}: " + " | ".join(s for _, s in terms))


def llm_floors(dims, prefill_len: int, max_context: int, steps: int, rank_bytes: float, checkpoint_bytes: float,
               written_bytes: float, rates: Rates, vision_patches: int, case_names: list[str]) -> dict[str, Floor]:
    """The floor of every stage of an LLM compile with validation (the prompts ``case_names``, sized from S as
    ``qvlc.validate.llm_cases`` builds them). ``rank_bytes``: the weights files of all ranks."""
    t, v, S = dims.text, dims.vision, prefill_len
    linear = t.layers * (2 * t.hidden * t.heads * t.head_dim + 2 * t.hidden * t.kv_heads * t.head_dim
                         + 3 * t.hidden * t.intermediate)
    attn_width = t.layers * t.heads * t.head_dim
    sizes = {"text_short": max(8, S // 4), "one_image_half": S // 2, "two_images_full": S, "image_and_video": S * 3 // 4}
    prompts = [sizes[n] for n in case_names]
    cases = len(prompts)
    seqs = [n + steps for n in prompts]
    mem, disk = rates.memory_gbps * 1e3, rates.disk_read_mbps
    prefill = cases * (2 * S * linear + 4 * S * S * attn_width + 2 * t.hidden * t.vocab)
    decode_bytes = cases * steps * (rank_bytes + 2 * t.layers * t.kv_heads * t.head_dim * max_context * 2)
    oracle = sum(2 * T * linear + 4 * T * T * attn_width for T in seqs) + cases * (steps + 1) * 2 * t.hidden * t.vocab
    tower = vision_patches * 2 * (v.depth * (4 * v.embed_dim**2 + 2 * v.embed_dim * v.mlp_hidden))
    return {
        "export": _floor(0, [(checkpoint_bytes, disk, "read"), (written_bytes, rates.disk_write_mbps, "written")],
                         rates, "read the checkpoint, write the artifact"),
        "vision rows": _floor(tower, [], rates, f"the tower's linears on {vision_patches} patches"),
        "prefill (onnxruntime)": _floor(prefill, [(rank_bytes, disk, "read")], rates,
                                        f"{cases} prefills at S = {S} (linears, S x S attention, lm_head)"),
        "decode (onnxruntime)": _floor(0, [(decode_bytes, mem, "from memory")], rates,
                                       f"{cases} x {steps} steps, each reading every rank's weights and KV once"),
        "oracle": _floor(oracle, [(checkpoint_bytes, disk, "read")], rates,
                         f"fp32 over {sum(seqs)} tokens (linears, T x T attention, lm_head at the generated ones)"),
        "quantization error": _floor(oracle, [(checkpoint_bytes, disk, "read")], rates, "a second oracle pass"),
        "kv cache error": _floor(oracle, [(checkpoint_bytes, disk, "read")], rates, "a second oracle pass"),
        "manifest": _floor(0, [(written_bytes + checkpoint_bytes, rates.sha256_mbps, "hashed")], rates,
                           "sha256 of the artifact and the checkpoint"),
    }


def print_floors(timings: dict[str, float], phases: list[dict], floors: dict[str, Floor], rates: Rates) -> None:
    """Each measured stage (validation by phase) beside its floor, and the ratio."""
    print(rates.line())
    rows = [(k, s) for k, s in timings.items() if k != "validate"] + [(p["phase"], p["seconds"]) for p in phases]
    print(f"  {'stage':<24} {'measured s':>10} {'floor s':>9} {'ratio':>6}  floor basis")
    for name, seconds in rows:
        f = floors.get(name)
        if f is None:
            print(f"  {name:<24} {seconds:10.1f}")
            continue
        print(f"  {name:<24} {seconds:10.1f} {f.seconds:9.1f} {seconds / max(f.seconds, 1e-9):6.2f}  {f.basis}")
    if "validate" in timings:
        total = sum(floors[p["phase"]].seconds for p in phases if p["phase"] in floors)
        print(f"  {'validate (all phases)':<24} {timings['validate']:10.1f} {total:9.1f} "
              f"{timings['validate'] / max(total, 1e-9):6.2f}")


def print_llm_floors(result, checkpoint: Path, workdir: Path, steps: int) -> None:
    """Measure the rates here, then print every stage of ``result`` (a CompileResult of an LLM part) beside its
    floor."""
    import json

    from qvlc.checkpoint.inspect import inspect_checkpoint

    _, dims = inspect_checkpoint(checkpoint)
    m = json.loads((result.folder / "manifest.json").read_text())
    spec = m["llm"]
    files = {f["path"]: f["bytes"] for f in m["files"]}
    rank_bytes = sum(b for p, b in files.items() if p.endswith("weights.data"))
    shards = sorted(checkpoint.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    ck_bytes = sum(p.stat().st_size for p in shards)
    rates = Rates.measure(shards[-1], workdir)
    report = result.report
    names = report.cases["run"] if report is not None else []
    patches = spec["prefill_len"] // 8 * dims.vision.merge_unit if "one_image_half" in names else 0
    floors = llm_floors(dims, spec["prefill_len"], spec["max_context"], steps, rank_bytes, ck_bytes,
                        result.export.bytes_written, rates, patches, names)
    print_floors(result.timings, report.phases if report is not None else [], floors, rates)
