"""Chunked prefill at the real 2B shapes: time to first token and `qvlc eval` seconds per item, chunks against the
full S = 2048 prefill, on random weights.

    .venv/bin/python benchmarks/bench_chunk_2b.py --workdir /work/bench --chunks 128 256 --items 20 \
        --baseline-items 5 --eval-chunk 128

Reuses the random Qwen2-VL-2B checkpoint and synthetic tokenizer of bench_eval_2b.py and its LLM artifact (fp16,
S = 2048, C = 4096; compiled without validation, the figures are time), compiles one LLM artifact per chunk length
T with ``export.prefill_chunk: T``, and a visual artifact at N = ``--max-patches`` (default 1024: a 448 x 448 image
exactly; the visual graph's cost is the same static N with or without chunks, so a small N keeps the LLM's share
visible). Then, for the full prefill and each T:

1. time to first token of a ~300-token image prompt (a 448 x 448 image, 256 vision tokens, and a question),
   ``--repeats`` times after a warm-up call, median: end to end (visual graph included) and the LLM alone;
2. `qvlc eval` on an MMBench-layout file of 448 x 448 single-image questions (no circular copies), seconds per
   item: ``--items`` items with the chunk graph of T = ``--eval-chunk``, the first ``--baseline-items`` of them with
   the full prefill (every item costs the same static S there);

and prints each against the full prefill's, and the bytes each chunk graph adds to the artifact.
"""

from __future__ import annotations

import argparse
import base64
import csv
import gc
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval_2b import compile_part, eval2b_setup, image_b64  # noqa: E402

QUESTION = ("Look at the picture carefully and answer the question. Which of the shapes listed in the options "
            "appears in the centre of the picture, and what colour does it have?")


def items_tsv(path: Path, items: int) -> Path:
    cols = ["index", "question", "A", "B", "C", "D", "answer", "image", "category"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        w.writeheader()
        for q in range(items):
            size = (448, 448)
            w.writerow({"index": q, "question": "Which shape is in the picture?", "A": "a red square",
                        "B": "a blue circle", "C": "a green triangle", "D": "a yellow star", "answer": "ABCD"[q % 4],
                        "image": image_b64(q, *size), "category": "shapes"})
    return path


def time_to_first_token(llm: Path, visual: Path, repeats: int) -> tuple[float, float, int]:
    """(median end-to-end TTFT, median LLM-only TTFT, prompt tokens); sessions opened by a first, untimed call."""
    from PIL import Image

    from qvlc.runtime.vlm import VlmPipeline

    pipe = VlmPipeline(llm, visual)
    image = Image.open(io.BytesIO(base64.b64decode(image_b64(1, 448, 448)))).convert("RGB")
    prepared = pipe.prepare([image], QUESTION)
    pipe.generate_prepared(prepared, 1)  # warm: sessions opened, pages read
    ends, llms = [], []
    for _ in range(repeats):
        ends.append(pipe.generate_prepared(prepared, 1).time_to_first_token)
        window = pipe.llm.prompt_window(prepared.input_ids, pipe.media(prepared, pipe.vision_rows(prepared)))
        t0 = time.perf_counter()
        pipe.llm.logits_of(pipe.llm.prefill_window(window))
        llms.append(time.perf_counter() - t0)
    n = len(prepared.input_ids)
    del pipe
    gc.collect()
    return statistics.median(ends), statistics.median(llms), n


def eval_seconds(llm: Path, visual: Path, data: Path, out: Path, items: int) -> tuple[float, dict]:
    from qvlc.eval.evaluate import evaluate

    t0 = time.perf_counter()
    res = evaluate(llm, visual, data, out, max_new_tokens=1, limit=items)
    gc.collect()
    return (time.perf_counter() - t0) / res["items"], res


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--baseline-items", type=int, default=5)
    ap.add_argument("--eval-chunk", type=int, default=128)
    ap.add_argument("--max-patches", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ck, out = eval2b_setup(args.workdir, args.seed)
    base = {"prefill_len": 2048, "max_context": 4096, "max_patches": 5120}
    visual, t = compile_part(ck, out, "visual", {"max_patches": args.max_patches},
                             name=f"eval2b_visual_{args.max_patches}")
    arts = {0: compile_part(ck, out, "llm", base)}
    for T in args.chunks:
        arts[T] = compile_part(ck, out, "llm", {**base, "prefill_chunk": T}, name=f"eval2b_llm_chunk{T}")
    for T, (folder, secs) in arts.items():
        added = (folder_bytes(folder) - folder_bytes(arts[0][0])) / 1e6
        print(f"{'full prefill' if not T else f'T = {T}':>13}: {folder} (compiled in {secs:.0f} s; 0: reused), "
              f"{folder_bytes(folder) / 1e9:.3f} GB"
              + (f", chunk graph + its .onnx: {added:+.2f} MB against the full-prefill artifact" if T else ""))
    data = items_tsv(out / "single_image_items.tsv", args.items)
    rows = {}
    for T, (folder, _) in arts.items():
        end, llm, n = time_to_first_token(folder, visual, args.repeats)
        rows[T] = {"ttft": end, "llm": llm, "tokens": n}
        print(f"{'full prefill' if not T else f'T = {T}':>13}: prompt {n} tokens, time to first token median "
              f"{end:.2f} s end to end, {llm:.2f} s in the LLM ({args.repeats} runs)", flush=True)
        if T in (0, args.eval_chunk):
            per_item, res = eval_seconds(folder, visual, data, out / f"results_chunk{T}.json",
                                         args.items if T else args.baseline_items)
            rows[T]["eval"] = per_item
            print(f"{'':>13}  qvlc eval: {res['items']} items, {per_item:.1f} s per item, ttft median "
                  f"{res['time_to_first_token_s']['median']:.1f} s, errors {res['errors']}", flush=True)
    full = rows[0]
    for T in args.chunks:
        r = rows[T]
        print(f"T = {T}: time to first token {r['ttft'] / full['ttft']:.3f}x end to end, "
              f"{r['llm'] / full['llm']:.3f}x in the LLM"
              + (f"; eval {r['eval'] / full['eval']:.3f}x seconds per item" if "eval" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
