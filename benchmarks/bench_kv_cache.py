"""The int8 KV cache at a long context: how many sequences' caches fit per GiB, fp16 against int8.

    ../shared/tools/memcap 16 .venv/bin/python benchmarks/bench_kv_cache.py --workdir /work/bench

Compiles the random Qwen2-VL-2B LLM part (fp16, S = 2048, C = --max-context, default 32768) twice without
validation, with ``export.kv_cache: fp`` and ``int8`` (the parity proof of the int8 cache at real shapes is
``bench_llm_7b_tp4.py --kv-cache int8``), then for each:

1. the decode graph's cache per sequence, from its declared past inputs (``past_key_values`` and, for int8,
   ``past_kv_scales``), and how many such caches fit in one GiB;
2. the host's resident bytes per sequence, measured by holding ``--sequences`` sequences' caches (``snapshot``);
3. a ~300-token text prompt through the prefill graph, then ``--steps`` greedy decode steps against the full
   C - 1 cache: the median step time and the tokens (int8's compared with fp16's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval_2b import compile_part, eval2b_setup  # noqa: E402

GIB = 1 << 30


def declared_cache_bytes(folder: Path) -> int:
    from qvlc.artifact.layout import DECODE
    from qvlc.artifact.manifest import read_manifest

    decode = read_manifest(folder).graph(DECODE)  # tp = 1: the one decode graph
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in decode.inputs if t.name.startswith("past_"))


def measure(folder: Path, sequences: int, steps: int, prompt: np.ndarray) -> dict:
    from qvlc.host.rope import decode_position
    from qvlc.runtime.llm import LlmRuntime
    from qvlc.validate.phases import resident_gb

    rt = LlmRuntime(folder)
    w = rt.prompt_window(prompt)
    t0 = time.perf_counter()
    logits = rt.logits_of(rt.prefill_window(w))
    prefill = time.perf_counter() - t0
    rt.release_prefill()
    anon0 = resident_gb()[0]
    held = [rt.snapshot() for _ in range(sequences)]
    per_sequence = (resident_gb()[0] - anon0) * 1e9 / sequences
    del held
    tokens, times = [], []
    for step in range(steps):
        tokens.append(int(np.argmax(logits)))
        t0 = time.perf_counter()
        position = decode_position(rt.spec.prefill_len, step, w.delta)
        logits = rt.logits_of(rt.decode(rt.embed.lookup(np.array(tokens[-1:]))[0], position))
        times.append(time.perf_counter() - t0)
    return {"prefill_s": prefill, "host_bytes": per_sequence, "decode_s": statistics.median(times[1:] or times),
            "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--max-context", type=int, default=32768)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ck, out = eval2b_setup(args.workdir, args.seed)
    prompt = np.random.default_rng(args.seed).integers(1000, 100000, 300)
    rows = {}
    for kind in ("fp", "int8"):
        folder, seconds = compile_part(ck, out, "llm", {"prefill_len": 2048, "max_context": args.max_context,
                                                        "kv_cache": kind}, name=f"kv2b_{kind}_{args.max_context}")
        print(f"compiled {folder.name} in {seconds:.1f} s" if seconds else f"reusing {folder}")
        rows[kind] = {"declared": declared_cache_bytes(folder), **measure(folder, args.sequences, args.steps, prompt)}
    fp, q = rows["fp"], rows["int8"]
    print(f"\n== random Qwen2-VL-2B LLM, fp16, S = 2048, C = {args.max_context}: one sequence's KV cache ==")
    print(f"{'cache':<6} {'decode past inputs':>20} {'per GiB':>8} {'host, measured':>16} {'decode step':>12} "
          f"{'prefill':>8}")
    for kind, r in rows.items():
        print(f"{kind:<6} {r['declared'] / 2**20:>16.1f} MiB {GIB / r['declared']:>8.2f} "
              f"{r['host_bytes'] / 2**20:>12.1f} MiB {r['decode_s']:>10.2f} s {r['prefill_s']:>6.1f} s")
    print(f"int8 / fp16: cache {q['declared'] / fp['declared']:.3f}x, sequences per GiB "
          f"{fp['declared'] / q['declared']:.2f}x, host {q['host_bytes'] / fp['host_bytes']:.3f}x, decode step "
          f"{q['decode_s'] / fp['decode_s']:.2f}x")
    same = sum(a == b for a, b in zip(fp["tokens"], q["tokens"]))
    print(f"greedy tokens: fp16 {fp['tokens']}, int8 {q['tokens']} ({same}/{len(fp['tokens'])} equal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
