"""One property per input surface: ``SURFACES[name](ws, draw)`` draws a hostile input, feeds it to the code that
reads it, and asserts the outcome (``surfaces.expect``). Shared by ``test_fuzz.py`` (bounded, in CI) and
``benchmarks/fuzz.py`` (long runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml
from hypothesis import strategies as st
from surfaces import (
    REPO,
    Workspace,
    expect,
    json_bytes,
    jsonl_records,
    mp4_bytes,
    mutated,
    mutated_bytes,
    only_files,
    outcome,
    png_bytes,
    split_safetensors,
    tsv_text,
    with_header,
    yaml_text,
)

from qvlc.artifact.layout import MANIFEST, MANIFEST_DIGEST, PARITY_JSON, PREPROCESS
from qvlc.artifact.trust import checked_artifact, verify
from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.processor import preprocess_config
from qvlc.checkpoint.tokenizer import load_processor
from qvlc.compile.plan import checked_plan
from qvlc.config.loading import config_from_dict, load_config
from qvlc.eval.bench_data import read_items
from qvlc.runtime.artifact import open_artifact, read_preprocess
from qvlc.runtime.llm import LlmRuntime
from qvlc.runtime.media import load_video, open_image
from qvlc.runtime.visual import VisualRuntime

Draw = Callable[[st.SearchStrategy], Any]
CONFIGS = {"native_llm": REPO / "configs/tiny_llm.yaml", "native_visual": REPO / "configs/tiny_visual.yaml",
           "vamc_llm": REPO / "examples/vamc_tiny_llm.yaml",
           "vamc_visual": REPO / "examples/vamc_tiny_qwen2_5_vl_visual.yaml"}
CHECKPOINT_JSON = ("config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "tokenizer_config.json", "chat_template.json", "generation_config.json", "special_tokens_map.json",
                   "model.safetensors.index.json")


def _config(ws: Workspace, draw: Draw, layout: str) -> None:
    name = draw(st.sampled_from([k for k in CONFIGS if k.startswith(layout)]))
    base = yaml.safe_load(CONFIGS[name].read_text())
    folder = ws.root / "cfg"
    folder.mkdir(exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_bytes(draw(yaml_text(base)))

    def run() -> None:
        cfg = load_config(path)
        if cfg.model.checkpoint.startswith("tiny"):  # the checks against the checkpoint too (no weight is read)
            checked_plan(cfg)

    expect(outcome(run), {0, 2})
    only_files(folder, {"cfg.yaml"})


def _plan_of(ck: Path, part: str):
    raw = {"name": "fz", "part": part, "model": {"checkpoint": str(ck)}}
    raw["export"] = {"prefill_len": 128, "max_context": 256} if part == "llm" else {"max_patches": 256}
    return checked_plan(config_from_dict(raw))


def checkpoint_json(ws: Workspace, draw: Draw) -> None:
    """A checkpoint whose JSON file is hostile: the compile's checks, the processor config and the tokenizer."""
    name = draw(st.sampled_from(CHECKPOINT_JSON))
    path = ws.tiny / name
    base = json.loads(path.read_text()) if path.is_file() else {"metadata": {}, "weight_map": {}}
    ws.write(path, draw(json_bytes(base)))

    def run() -> None:
        _plan_of(ws.tiny, "llm")
        fam, dims = inspect_checkpoint(ws.tiny)
        preprocess_config(ws.tiny, dims.vision, fam.video_rules)
        load_processor(ws.tiny)

    expect(outcome(run), {0, 2}, (name, "model.safetensors", "export.", "config.json"))


def safetensors_header(ws: Workspace, draw: Draw) -> None:
    path = ws.tiny / "model.safetensors"
    header, body = split_safetensors(path)
    kind = draw(st.sampled_from(("header", "header", "length")))
    if kind == "header":
        new = with_header(draw(json_bytes(header)), body)
    else:  # the length prefix alone: any 8 bytes before the original header
        new = draw(st.integers(min_value=0, max_value=2**64 - 1)).to_bytes(8, "little") + path.read_bytes()[8:]
    ws.write(path, new)
    expect(outcome(lambda: _plan_of(ws.tiny, "llm")), {0, 2}, ("model.safetensors",))


def _open_both(ws: Workspace) -> None:
    for folder, part in ((ws.llm, "llm"), (ws.visual, "visual")):
        verify(folder)
        open_artifact(folder, part, str(folder))
    LlmRuntime(ws.llm)
    VisualRuntime(ws.visual)


def manifest(ws: Workspace, draw: Draw) -> None:
    """An artifact whose manifest.json was edited and resealed: verify, open, and build the runtimes."""
    folder = draw(st.sampled_from((ws.llm, ws.visual)))
    base = json.loads((folder / MANIFEST).read_text())
    text = draw(json_bytes(base)).decode("utf-8", "surrogateescape")
    ws.reseal(folder, text)
    expect(outcome(lambda: _open_both(ws)), {0, 1, 2}, (MANIFEST, MANIFEST_DIGEST, str(folder)))


def preprocess_json(ws: Workspace, draw: Draw) -> None:
    """A visual artifact whose preprocess.json was edited and resealed: read, and a prompt with an image."""
    from qvlc.runtime.vlm import VlmPipeline

    path = ws.visual / PREPROCESS
    ws.write(path, draw(json_bytes(json.loads(path.read_text()))))
    ws.reseal(ws.visual)

    def run() -> None:
        read_preprocess(ws.visual)
        VlmPipeline(ws.llm, ws.visual).prepare([png_bytes_image()], "What is this?")

    expect(outcome(run), {0, 1, 2}, (PREPROCESS, "VISUAL_DIR"))


def png_bytes_image():
    return open_image(png_bytes())


def parity_json(ws: Workspace, draw: Draw) -> None:
    folder = draw(st.sampled_from((ws.llm, ws.visual)))
    path = folder / PARITY_JSON
    base = json.loads(path.read_text()) if path.is_file() else {"passed": True}
    ws.write(path, draw(json_bytes(base)))
    ws.reseal(folder)
    expect(outcome(lambda: (verify(folder), checked_artifact(folder, None, str(folder)))), {0, 1})


def image_bytes(ws: Workspace, draw: Draw) -> None:
    base = png_bytes(fmt=draw(st.sampled_from(("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"))))
    data = draw(mutated_bytes(base))
    expect(outcome(lambda: open_image(data, max_pixels=1 << 20)), {0, 2}, ("image",))


_MP4: dict[str, bytes] = {}


def video_bytes(ws: Workspace, draw: Draw) -> None:
    if "mp4" not in _MP4:
        _MP4["mp4"] = mp4_bytes(ws.root)
    folder = ws.root / "video"
    folder.mkdir(exist_ok=True)
    path = folder / "clip.mp4"
    path.write_bytes(draw(mutated_bytes(_MP4["mp4"])))
    expect(outcome(lambda: load_video(path, 2.0, 2, 2.0)), {0, 2}, ("clip.mp4", "video"))
    only_files(folder, {"clip.mp4"})


def eval_tsv(ws: Workspace, draw: Draw) -> None:
    rows = [line.split("\t") for line in tsv_text().splitlines()]
    kind = draw(st.sampled_from(("cell", "cell", "cell", "line", "bytes")))
    if kind == "bytes":
        data = draw(mutated_bytes(tsv_text().encode()))
    else:
        r = draw(st.integers(min_value=0, max_value=len(rows) - 1))
        if kind == "cell":
            c = draw(st.integers(min_value=0, max_value=len(rows[r]) - 1))
            rows[r][c] = draw(st.text(max_size=30) | st.sampled_from(("", "A", "0", "5", "\t", "\"", "data:x,")))
        else:
            del rows[r]
        data = ("\n".join("\t".join(row) for row in rows) + "\n").encode("utf-8", "surrogatepass")
    path = ws.root / "bench.tsv"
    path.write_bytes(data)
    expect(outcome(lambda: read_items(path)), {0, 2}, ("bench.tsv", "--data"))


def eval_jsonl(ws: Workspace, draw: Draw) -> None:
    records = draw(mutated(jsonl_records()))
    lines = records if isinstance(records, list) else [records]
    data = "\n".join(json.dumps(r) for r in lines).encode()
    if draw(st.booleans()):
        data = draw(mutated_bytes(data or b"{}"))
    path = ws.root / "bench.jsonl"
    path.write_bytes(data)
    expect(outcome(lambda: read_items(path)), {0, 2}, ("bench.jsonl", "--data"))


SURFACES: dict[str, Callable[[Workspace, Draw], None]] = {
    "config (native)": lambda ws, draw: _config(ws, draw, "native"),
    "config (vamc)": lambda ws, draw: _config(ws, draw, "vamc"),
    "checkpoint JSON files": checkpoint_json,
    "safetensors header": safetensors_header,
    "artifact manifest.json": manifest,
    "artifact preprocess.json": preprocess_json,
    "artifact parity.json": parity_json,
    "image bytes": image_bytes,
    "video bytes": video_bytes,
    "eval TSV": eval_tsv,
    "eval JSONL": eval_jsonl,
}
