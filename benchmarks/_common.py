"""Shared by the benchmarks: the random full-size checkpoints they compile, stage timing and peak memory."""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

ARTIFACTS = "artifacts"  # <workdir>/artifacts/<name>: where every benchmark writes its compiled artifact


CHECKPOINT_DIR = "qwen2_vl_2b_random"


def _build(folder: str, seed: int) -> None:
    from qvlc.checkpoint.tiny import shipped_config, write_random_checkpoint_streaming

    write_random_checkpoint_streaming(shipped_config("qwen2_vl_2b"), Path(folder), seed)


def ensure_checkpoint(workdir: Path, seed: int) -> Path:
    """The shared random 2B checkpoint, built under a lock (so a concurrent benchmark waits, then reuses it)."""
    folder = workdir / CHECKPOINT_DIR
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / f".{CHECKPOINT_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():
            print(f"checkpoint: reusing {folder}")
            return folder
        t0 = time.perf_counter()
        # A child process, so the build's memory is not counted in the compile's peak RSS.
        proc = multiprocessing.get_context("spawn").Process(target=_build, args=(str(folder), seed))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            sys.exit(f"building the random checkpoint failed (exit code {proc.exitcode})")
        print(f"checkpoint: built {folder} in {time.perf_counter() - t0:.1f} s "
              f"(peak RSS of the build {rss_gb(resource.RUSAGE_CHILDREN):.2f} GB)")
        return folder


def rss_gb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


class PrintProgress:
    """Prints each stage as it ends and keeps its wall time, also when a later stage fails."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        print(f"  {name} ...", flush=True)
        t0 = time.perf_counter()
        yield {}
        self.timings[name] = time.perf_counter() - t0
        print(f"  {name}: {self.timings[name]:.1f} s (peak RSS so far {rss_gb(resource.RUSAGE_SELF):.2f} GB)",
              flush=True)


def print_parity(report) -> None:
    """The parity verdict, the worst figures per graph and the greedy agreement, as each benchmark prints them."""
    if report is None:
        return
    s = report.summary()
    print(f"parity: {'PASS' if s['passed'] else 'FAIL'} ({s['checks']} checks); worst per graph:")
    for graph, w in s["worst_per_graph"].items():
        print(f"  {graph:<16} max_abs {w['max_abs']:.3e}  rel_l2 {w['rel_l2']:.3e}  min cosine {w['min_cosine']:.6f}")
    for t in s["tokens"]:
        print(f"  greedy {t['case']}: {t['matched']}/{t['of']} tokens agree with the oracle")
    for note in report.notes:
        print(f"  note: {note}")


def add_weights_args(ap) -> None:
    """--weights/--group-size/--dequantize/--method/--nsamples/--seqlen: export.weights, as both LLM benchmarks take it."""
    ap.add_argument("--weights", choices=("none", "int8", "int4"), default="none", help="export.weights.format")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dequantize", choices=("blocked", "explicit"), default="blocked")
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="export.weights.method")
    ap.add_argument("--nsamples", type=int, default=128, help="gptq: calibration.nsamples")
    ap.add_argument("--seqlen", type=int, default=512, help="gptq: calibration.seqlen")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="gptq: calibration.path (default: qvlc's built-in texts as input_ids, see calibration_ids)")


def calibration_ids(workdir: Path) -> Path:
    """The random checkpoints have no tokenizer: qvlc's built-in calibration texts tokenized with the shipped tiny
    tokenizer, written once as {"input_ids": [...]} records (ids < 1014, inside any Qwen2-VL vocabulary)."""
    import json

    from transformers import AutoTokenizer

    from qvlc.checkpoint.tokenizer import tiny_tokenizer_files
    from qvlc.export.calibration_texts import TEXTS

    path = workdir / "calibration_ids.jsonl"
    if not path.is_file():
        tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_files()[0].parent))
        path.write_text("".join(json.dumps({"input_ids": tok(t)["input_ids"]}) + "\n" for t in TEXTS))
    return path


def weights_export(args) -> tuple[str, dict]:
    """(artifact-name suffix, export keys) for the --weights arguments."""
    if args.weights == "none":
        return "", {}
    weights = {"format": args.weights, "group_size": args.group_size, "dequantize": args.dequantize,
               "method": args.method}
    suffix = f"_{args.weights}" + (f"g{args.group_size}" if args.weights == "int4" else "")
    if args.method == "gptq":
        weights["calibration"] = {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                  "path": str(args.calibration or calibration_ids(args.workdir))}
        suffix += f"_gptq{args.nsamples}x{args.seqlen}"
    return suffix, {"opset": 21, "weights": weights}


def print_cache(report, folder: Path) -> None:
    """The decode graph's cache (its past inputs, every rank) against the same artifact with an fp16 cache, and the
    KV cache error section of the report (export.kv_cache: int8)."""
    from dataclasses import replace

    from qvlc.artifact.manifest import read_manifest
    from qvlc.runtime.kvcache import sequence_bytes

    spec = read_manifest(folder).llm
    got, fp = sequence_bytes(spec), sequence_bytes(replace(spec, kv_cache="fp"))
    print(f"KV cache per sequence (decode's past inputs, {spec.tp} ranks, C - 1 = {spec.max_context - 1}): "
          f"{got / 2**20:.1f} MiB {spec.kv_cache} against {fp / 2**20:.1f} MiB {spec.dtype}: {got / fp:.3f}x")
    kv = report.kv_cache if report else None
    for p in (kv or {}).get("prompts", []):
        print(f"  kv cache error {p['case']:<18} worst logits cosine {p['worst_cosine']:.6f}, worst rel L2 "
              f"{p['worst_rel_l2']:.3e}, greedy tokens equal {p['tokens_matched']}/{p['of']}"
              f"{'' if p['passed'] else ' FAIL'}")


def print_quant_error(report) -> None:
    """The quantization-error verdict on the logits of each graph, as the LLM benchmarks print it."""
    q = report.quantization if report else None
    if not q:
        return
    if c := q.get("calibration"):
        r = c["gptq_over_rtn"]
        print(f"GPTQ calibration: {c['nsamples']} x {c['seqlen']} tokens from {c['source']} ({c['set_tokens']} tokens); "
              f"output error on them {r['median']:.3f}x round to nearest's (median over Linears; worst {r['worst']:.3f}x)")
    for graph in ("prefill", "decode"):
        rows = [r for r in q["checks"] if r["graph"] == graph and r["output"] == "logits"]
        print(f"quantization error, {graph} logits vs the unquantized model: worst cosine "
              f"{min(r['cosine'] for r in rows):.5f}, worst rel L2 {max(r['rel_l2'] for r in rows):.3e} "
              f"(floor {q['min_cosine']})")
