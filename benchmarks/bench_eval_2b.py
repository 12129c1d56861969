"""`qvlc eval` at the real 2B shapes: seconds per MMBench question (every circular copy), on random weights.

    .venv/bin/python benchmarks/bench_eval_2b.py --workdir /work/bench --questions 5

Builds (once, reused) the random Qwen2-VL-2B checkpoint of the other benchmarks and gives it a synthetic tokenizer:
the shipped tiny byte-level BPE padded to Qwen2-VL's vocabulary, with Qwen2-VL's special tokens at their real ids
(151643…), Qwen2-VL-Instruct's chat template and the released image and video processor settings — so `run`,
`serve` and `eval` take the checkpoint as a real one. Compiles the LLM (fp16, S = 2048, C = 4096) and the visual
part (fp16, N = 5120) without validation, writes an MMBench-layout TSV of ``--questions`` questions with four
circular copies each (synthetic images, 448 × 448 and 640 × 480), and runs `qvlc eval` on it, with the image
settings VLMEvalKit uses for Qwen2-VL (``--preset vlmevalkit``). Random weights answer noise: the figures are time.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_checkpoint  # noqa: E402

QWEN2_VL_SPECIAL = 151643  # <|endoftext|>, then Qwen2-VL's special tokens in order


def synthetic_tokenizer(folder: Path) -> None:
    """The tiny tokenizer, its regular vocabulary padded with never-produced entries up to Qwen2-VL's 151643 and
    Qwen2-VL's 14 special tokens at 151643…151656, with the released chat template and processor settings."""
    from qvlc.checkpoint.build_tiny_tokenizer import (
        REGULAR_VOCAB,
        SPECIAL_TOKENS,
        tokenizer_config,
        tokenizer_files,
    )

    files = tokenizer_files()
    tok = json.loads(files["tokenizer.json"])
    vocab = tok["model"]["vocab"]
    for i in range(REGULAR_VOCAB, QWEN2_VL_SPECIAL):
        vocab[f"\u0120qvlcfill{i}"] = i  # an entry no merge produces: the id exists, the text never maps to it
    for t in tok["added_tokens"]:
        t["id"] = QWEN2_VL_SPECIAL + SPECIAL_TOKENS.index(t["content"])
    cfg = tokenizer_config()
    cfg["added_tokens_decoder"] = {str(QWEN2_VL_SPECIAL + i): v for i, v in
                                   enumerate(cfg["added_tokens_decoder"].values())}
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    video = json.loads(files["video_preprocessor_config.json"])
    video.update(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)  # the released Qwen2-VL video bounds
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    for name in ("special_tokens_map.json", "chat_template.json", "preprocessor_config.json"):
        (folder / name).write_text(files[name])
    for stale in ("vocab.json", "merges.txt"):
        (folder / stale).unlink(missing_ok=True)


def image_b64(seed: int, w: int, h: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * (seed + 1)) % 256, (yy * 3) % 256, rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def mmbench_tsv(path: Path, questions: int) -> Path:
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category", "l2-category", "split"]
    rows = []
    for q in range(1, questions + 1):
        options = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
        size = (448, 448) if q % 2 else (640, 480)
        for k in range(4):
            rot = options[k:] + options[:k]
            rows.append({"index": q + k * 1_000_000, "question": "Which shape is in the picture?",
                         "hint": "Look at the centre of the image." if q % 3 == 0 else "",
                         **dict(zip("ABCD", rot)), "answer": "ABCD"[(0 - k) % 4],
                         "image": image_b64(q, *size) if k == 0 else str(q), "category": f"shapes_{q % 2}",
                         "l2-category": "coarse_perception", "split": "dev"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def compile_part(ck: Path, out: Path, part: str, export: dict, name: str = "") -> tuple[Path, float]:
    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict

    name = name or f"eval2b_{part}"
    if (out / name / "manifest.json").is_file():
        return out / name, 0.0
    t0 = time.perf_counter()
    raw = {"name": name, "part": part, "model": {"checkpoint": str(ck)}, "export": {"dtype": "fp16", **export},
           "validate": {"enabled": False}, "output": {"dir": str(out)}}
    return compile_artifact(config_from_dict(raw), force=True).folder, time.perf_counter() - t0


def eval2b_setup(workdir: Path, seed: int) -> tuple[Path, Path]:
    """(the random 2B checkpoint with its synthetic tokenizer, the folder its eval artifacts go to); libraries
    quieted, QVLC_CACHE defaulting to the checkout's."""
    os.environ.setdefault("QVLC_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "qvlc"))
    from qvlc.system.library_noise import quiet_libraries

    quiet_libraries()
    ck = ensure_checkpoint(workdir, seed)
    synthetic_tokenizer(ck)
    return ck, workdir / "eval2b"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ck, out = eval2b_setup(args.workdir, args.seed)
    from qvlc.eval.evaluate import PRESETS, evaluate

    llm, t_llm = compile_part(ck, out, "llm", {"prefill_len": 2048, "max_context": 4096, "max_patches": 5120})
    visual, t_vis = compile_part(ck, out, "visual", {"max_patches": 5120})
    print(f"compiled without validation: LLM {t_llm:.0f} s, visual {t_vis:.0f} s (0: reused)")
    data = mmbench_tsv(out / "mmbench_rotated.tsv", args.questions)
    t0 = time.perf_counter()
    res = evaluate(llm, visual, data, out / "results.json", max_new_tokens=args.max_new_tokens,
                   min_pixels=PRESETS["vlmevalkit"][0], max_pixels=PRESETS["vlmevalkit"][1])
    wall = time.perf_counter() - t0
    ps = res["predictions"]
    print(f"{res['questions']} questions, {res['items']} rows ({res['metric']}), {wall:.0f} s in all: "
          f"{wall / res['questions']:.1f} s per question, {wall / res['items']:.1f} s per row")
    print(f"time to first token: median {res['time_to_first_token_s']['median']:.1f} s; decode "
          f"{res['decode_tokens_per_second']['median']:.2f} tokens/s; vision tokens per row "
          f"{sorted({p['vision_tokens'] for p in ps})}; resized {res['resized']}; errors {res['errors']}")
    print(f"image settings: {res['image_settings']}")
    print(f"accuracy {res['accuracy']:.3f} (circular), vanilla_0 {res['vanilla_0_accuracy']:.3f}, "
          f"vanilla_all {res['vanilla_all_accuracy']:.3f} — random weights: noise, not a score")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
