"""Bad inputs and faults, table-driven, through the CLI as a user meets them: each ends with its documented exit
code and one message naming the key or file, never a traceback, and leaves nothing half-written behind."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import signal
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from qvlc.cli.app import app
from qvlc.errors import Interrupted

S, C, N = 64, 96, 64


@dataclasses.dataclass
class Case:
    name: str
    code: int
    fragment: str  # must appear in the output (the key, the file, or the problem)
    setup: Callable  # setup(env) -> argv; may edit files and monkeypatch through env
    left: tuple[str, ...] = ()  # entries allowed in the output folder afterwards


class Env:
    def __init__(self, tmp_path: Path, monkeypatch, artifacts, tiny: Path) -> None:
        self.tmp, self.mp, self.artifacts, self.tiny = tmp_path, monkeypatch, artifacts, tiny
        self.out = tmp_path / "out"

    def config(self, raw: dict | str, name: str = "cfg.yaml") -> str:
        path = self.tmp / name
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
        return str(path)

    def llm(self, **export) -> dict:
        return {"name": "x", "part": "llm", "export": {"prefill_len": S, "max_context": C, **export},
                "validate": {"enabled": False}, "output": {"dir": str(self.out)}}

    def compile(self, raw: dict | str, *extra: str) -> list[str]:
        return ["compile", self.config(raw), *extra]

    def checkpoint(self, edit: Callable[[Path], None]) -> list[str]:
        ck = self.tmp / "ck[v2]"
        shutil.copytree(self.tiny, ck)
        edit(ck)
        raw = self.llm()
        raw["model"] = {"checkpoint": str(ck)}
        return self.compile(raw)

    def artifact(self, part: str, edit: Callable[[Path], None] | None = None) -> Path:
        dst = self.tmp / f"art_{part}"
        shutil.copytree(self.artifacts[part], dst)
        if edit is not None:
            edit(dst)
        return dst

    def image(self) -> str:
        path = self.tmp / "img.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
        return str(path)

    def run(self, llm: Path | None = None, visual: Path | None = None, *extra: str) -> list[str]:
        return ["run", str(llm or self.artifact("llm")), str(visual or self.artifact("visual")), "--prompt", "hi",
                "-n", "2", *extra]


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _reseal(folder: Path, edit: Callable[[dict], None]) -> None:
    from qvlc.artifact.manifest import Manifest, write_manifest

    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    write_manifest(folder, Manifest.from_dict(data))


def _raise_in_export(env: Env, exc: BaseException) -> list[str]:
    def boom(*_a, **_k):
        raise exc

    env.mp.setattr("qvlc.compile.stages.export", boom)
    return env.compile(env.llm())


def _hold_lock(env: Env) -> list[str]:
    from qvlc.artifact.publish import CompileLock

    lock = CompileLock(env.out / "x").__enter__()
    env.mp.setattr(env, "lock", lock, raising=False)
    return env.compile(env.llm())


def _vamc(**extra) -> dict:
    raw = {"name": "v", "frontend": {"checkpoint": "tiny", "shape": {"input_ids": [[S], [C]]},
                                     "model_kwargs": {"tp": 1, "build_visual": False}}}
    for k, v in extra.items():
        node = raw
        *path, last = k.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return raw


def _gptq(e: Env, content: str = "", name: str = "c.jsonl", path: str | None = None, checkpoint: str = "") -> dict:
    """An int8 GPTQ compile whose calibration set is ``content`` (written to ``name``), or ``path``, or built in."""
    calibration = {"nsamples": 2, "seqlen": 16}
    if content:
        (e.tmp / name).write_text(content)
        calibration["path"] = str(e.tmp / name)
    elif path is not None:
        calibration["path"] = str(e.tmp / path)
    raw = e.llm(opset=21, weights={"format": "int8", "method": "gptq", "calibration": calibration})
    if checkpoint:
        raw["model"] = {"checkpoint": checkpoint}
    return raw


def _untokenized(e: Env) -> str:
    """The tiny checkpoint without its tokenizer files."""
    ck = e.tmp / "ck_no_tokenizer"
    shutil.copytree(e.tiny, ck)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (ck / f).unlink(missing_ok=True)
    return str(ck)


CASES = [
    # ---- config files
    Case("config missing", 2, "not found", lambda e: ["compile", str(e.tmp / "nope.yaml")]),
    Case("config is a folder", 2, "is a folder", lambda e: ["compile", str(e.tmp)]),
    Case("config not utf-8", 2, "not UTF-8", lambda e: ["compile", _latin1(e)]),
    Case("config invalid yaml", 2, "not valid YAML", lambda e: e.compile("name: [unclosed\n")),
    Case("config is a list", 2, "YAML mapping", lambda e: e.compile("- a\n- b\n")),
    Case("duplicate export blocks", 2, "appears twice", lambda e: e.compile(
        "name: x\npart: llm\nexport:\n  tp: 1\nexport:\n  dtype: fp16\n")),
    Case("unknown key", 2, "did you mean 'prefill_len'", lambda e: e.compile(
        {**e.llm(), "export": {"prefil_len": 64}})),
    Case("bad dtype", 2, "export.dtype", lambda e: e.compile(e.llm(dtype="bf16"))),
    Case("prefill_len 0 hints 64", 2, "use 64", lambda e: e.compile(e.llm(prefill_len=0))),
    Case("prefill_len not x16", 2, "use 112", lambda e: e.compile(e.llm(prefill_len=100, max_context=256))),
    Case("prefill_len >= max_context", 2, "export.prefill_len", lambda e: e.compile(e.llm(prefill_len=96))),
    Case("prefill_len beyond the model", 2, "max_position_embeddings", lambda e: e.compile(
        e.llm(prefill_len=8192, max_context=8208))),
    Case("max_context beyond the model", 2, "max_position_embeddings", lambda e: e.compile(
        e.llm(max_context=1 << 20))),
    Case("max_patches not x16", 2, "export.max_patches", lambda e: e.compile(
        {**e.llm(), "part": "visual", "export": {"max_patches": 1000}})),
    Case("max_patches beyond memory", 2, "needs about", lambda e: e.compile(
        {**e.llm(), "part": "visual", "validate": {"enabled": True}, "export": {"max_patches": 1 << 20}})),
    Case("opset 99", 2, "export.opset", lambda e: e.compile(e.llm(opset=99))),
    Case("opset 13", 2, "export.opset", lambda e: e.compile(e.llm(opset=13))),
    Case("tp does not divide", 2, "tp = 1, 2, 4", lambda e: e.compile(e.llm(tp=3))),
    Case("tp for the visual part", 2, "never split", lambda e: e.compile(
        {**e.llm(), "part": "visual", "export": {"tp": 2, "max_patches": N}})),
    Case("decode_steps beyond the cache", 2, "validate.decode_steps", lambda e: e.compile(
        {**e.llm(), "validate": {"decode_steps": 40}})),
    Case("generate_tokens beyond the cache", 2, "validate.generate_tokens", lambda e: e.compile(
        {**e.llm(), "validate": {"generate_tokens": 64}})),
    Case("name with a slash", 2, "usable folder name", lambda e: e.compile({**e.llm(), "name": "a/b"})),
    Case("name ending .failed", 2, "ends with .failed", lambda e: e.compile({**e.llm(), "name": "x.failed"})),
    Case("no name", 2, "name", lambda e: e.compile({k: v for k, v in e.llm().items() if k != "name"})),
    Case("bad part", 2, "part", lambda e: e.compile({**e.llm(), "part": "audio"})),
    Case("string boolean", 2, "export.simplify", lambda e: e.compile(e.llm(simplify="yes"))),
    Case("negative workers", 2, "export.workers", lambda e: e.compile(e.llm(workers=-1))),
    Case("memory limit env not a number", 2, "QVLC_MEMORY_LIMIT_GB", lambda e: (
        e.mp.setenv("QVLC_MEMORY_LIMIT_GB", "lots"), e.compile(e.llm()))[1]),
    Case("memory estimate refused", 2, "needs about", lambda e: (
        e.mp.setenv("QVLC_MEMORY_LIMIT_GB", "0.001"), e.compile({**e.llm(), "validate": {"enabled": True}}))[1]),
    # ---- vamc-style files
    Case("vamc build_visual as a string", 2, "build_visual", lambda e: e.compile(
        _vamc(frontend__model_kwargs__build_visual="no"))),
    Case("vamc with a native export block", 2, "native key 'export'", lambda e: e.compile(
        {**_vamc(), "export": {"tp": 2}})),
    Case("vamc quantize type qvlc lacks (never silently fp16)", 2, "'w4a8'", lambda e: e.compile(
        _vamc(frontend__quantize__type="w4a8", backend__dtype="float16"))),
    Case("vamc w16kv8 with int8 weights asked", 2, "w16kv8 keeps fp16 weights", lambda e: e.compile(
        _vamc(frontend__quantize__type="w16kv8", backend__dtype="int8"))),
    Case("vamc calibration dataset alone", 2, "calibration dataset without", lambda e: e.compile(
        _vamc(frontend__dataset__path="texts.jsonl"))),
    Case("vamc dataset by name only (no download)", 2, "dataset.path", lambda e: e.compile(
        _vamc(frontend__quantize__type="w8a16_gptq", backend__dtype="int8", dataset__name="wikitext2"))),
    Case("vamc quantize key qvlc lacks", 2, "frontend.quantize.bits", lambda e: e.compile(
        _vamc(frontend__quantize__type="w8a16_gptq", frontend__quantize__bits=4))),
    Case("vamc int8 without a quantize type", 2, "w8a16_gptq", lambda e: e.compile(_vamc(backend__dtype="int8"))),
    Case("vamc pixel_values malformed", 2, "frontend.shape.pixel_values", lambda e: e.compile(
        _vamc(frontend__shape__pixel_values=[256]))),
    Case("vamc pixel width wrong", 2, "1176", lambda e: e.compile(
        _vamc(frontend__shape__pixel_values=[256, 1000], frontend__model_kwargs__build_visual=True))),
    Case("vamc input_ids malformed", 2, "frontend.shape.input_ids", lambda e: e.compile(
        _vamc(frontend__shape__input_ids=[64, 96]))),
    Case("vamc dtype unsupported", 2, "backend.dtype", lambda e: e.compile(_vamc(backend__dtype="int3"))),
    Case("vamc fullatt mismatch", 2, "[1, 3]", lambda e: e.compile(
        _vamc(frontend__checkpoint="tiny:qwen2_5_vl", backend__compile__fullatt_block_indexes=[7, 15]))),
    # ---- calibration sets (export.weights.method: gptq): refused in the check stage, before any weight is read
    Case("gptq calibration file missing", 2, "calibration.path", lambda e: e.compile(_gptq(e, path="gone.jsonl"))),
    Case("gptq calibration not JSONL", 2, "not valid JSONL", lambda e: e.compile(_gptq(e, "{oops\n"))),
    Case("gptq calibration record of another shape", 2, "record 1", lambda e: e.compile(
        _gptq(e, json.dumps(["a text", {"ids": [1]}]), name="c.json"))),
    Case("gptq calibration shorter than seqlen", 2, "fewer than one window", lambda e: e.compile(
        _gptq(e, '{"input_ids": [1, 2, 3]}\n'))),
    Case("gptq calibration token outside the vocabulary", 2, "outside the model's vocabulary", lambda e: e.compile(
        _gptq(e, json.dumps({"input_ids": [99999] * 16}) + "\n"))),
    Case("gptq texts without a tokenizer", 2, "has none", lambda e: e.compile(_gptq(e, "", checkpoint=_untokenized(e)))),
    Case("calibration with method rtn", 2, "export.weights.calibration", lambda e: e.compile(
        e.llm(opset=21, weights={"format": "int8", "calibration": {"nsamples": 4}}))),
    # ---- checkpoints
    Case("checkpoint missing", 2, "does not exist", lambda e: e.compile(
        {**e.llm(), "model": {"checkpoint": str(e.tmp / "gone [/]")}})),
    Case("checkpoint is a file", 2, "is a file", lambda e: e.compile(
        {**e.llm(), "model": {"checkpoint": e.config("x: 1", "file.yaml")}})),
    Case("unknown tiny family", 2, "tiny:qwen2_5_vl", lambda e: e.compile(
        {**e.llm(), "model": {"checkpoint": "tiny:llama"}})),
    Case("no config.json", 2, "no config.json", lambda e: e.checkpoint(lambda ck: (ck / "config.json").unlink())),
    Case("config.json invalid", 2, "fix: restore", lambda e: e.checkpoint(
        lambda ck: (ck / "config.json").write_text("{oops"))),
    Case("config.json other model", 2, "'llama'", lambda e: e.checkpoint(
        lambda ck: _edit_json(ck / "config.json", lambda d: d.update(model_type="llama")))),
    Case("config.json missing field", 2, "num_attention_heads", lambda e: e.checkpoint(
        lambda ck: _edit_json(ck / "config.json", lambda d: [x.pop("num_attention_heads") for x in (d, d["text_config"])]))),
    Case("no weights", 2, "no model.safetensors", lambda e: e.checkpoint(
        lambda ck: (ck / "model.safetensors").unlink())),
    Case("truncated safetensors", 2, "truncated", lambda e: e.checkpoint(
        lambda ck: _truncate(ck / "model.safetensors"))),
    Case("garbage safetensors", 2, "safetensors", lambda e: e.checkpoint(
        lambda ck: (ck / "model.safetensors").write_bytes(b"\x00" * 64))),
    Case("weights of another shape", 2, "shape", lambda e: e.checkpoint(
        lambda ck: _edit_json(ck / "config.json", lambda d: [x.update(intermediate_size=96) for x in (d, d["text_config"])]))),
    # ---- output folder, locks, environment, interrupts
    Case("output.dir is a file", 2, "output.dir", lambda e: e.compile(
        {**e.llm(), "output": {"dir": e.config("x: 1", "afile")}})),
    Case("output.dir under a file", 2, "output.dir", lambda e: (e.config("x", "afile2"), e.compile(
        {**e.llm(), "output": {"dir": str(e.tmp / "afile2" / "sub")}}))[1]),
    Case("existing artifact without --force", 2, "--force", lambda e: (
        (e.out / "x").mkdir(parents=True), e.compile(e.llm()))[1], left=("x",)),
    Case("foreign folder with --force", 2, "not written by qvlc", lambda e: (
        (e.out / "x").mkdir(parents=True), e.compile(e.llm(), "--force"))[1], left=("x",)),
    Case("compile of the same name running", 2, "another qvlc compile", _hold_lock, left=(".x.lock",)),
    Case("disk full", 3, "disk is full", lambda e: _raise_in_export(e, OSError(errno.ENOSPC, "No space left",
                                                                               str(e.out)))),
    Case("read-only filesystem", 3, "read-only", lambda e: _raise_in_export(e, OSError(errno.EROFS, "ro", "/x"))),
    Case("permission denied", 3, "permission denied", lambda e: _raise_in_export(e, PermissionError(
        errno.EACCES, "denied", "/x"))),
    Case("internal error", 4, "traceback is in", lambda e: _raise_in_export(e, RuntimeError("bug"))),
    Case("SIGINT", 130, "SIGINT", lambda e: _raise_in_export(e, KeyboardInterrupt())),
    Case("SIGTERM", 143, "SIGTERM", lambda e: _raise_in_export(e, Interrupted(signal.SIGTERM))),
    # ---- verify
    Case("verify missing folder", 2, "does not exist", lambda e: ["verify", str(e.tmp / "nope")]),
    Case("verify a folder without manifest", 2, "no manifest.json", lambda e: ["verify", str(e.tmp)]),
    Case("verify manifest invalid json", 1, "changed after the compile", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: (a / "manifest.json").write_text("{oops")))]),
    Case("verify manifest []", 1, "changed after the compile", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: (a / "manifest.json").write_text("[]")))]),
    Case("verify manifest edited", 1, "changed after the compile", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: _edit_json(a / "manifest.json", lambda d: d["llm"].update(prefill_len=65))))]),
    Case("verify manifest digest missing", 1, "manifest.sha256", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: (a / "manifest.sha256").unlink()))]),
    Case("verify resealed invalid manifest", 1, "expected an object", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: _reseal_text(a, "[]")))]),
    Case("verify flipped byte", 1, "embed_tokens.bin: sha256", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: _flip(a / "embed_tokens.bin")))]),
    Case("verify truncated weights", 1, "llm_weights.data", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: _truncate(a / "llm_weights.data")))]),
    Case("verify extra file", 1, "not in the manifest", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: (a / "stray.txt").write_text("x")))]),
    Case("verify failed artifact", 1, "parity: FAILED", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: _reseal(a, lambda d: d["parity"].update(passed=False))))]),
    # ---- run
    Case("run damaged manifest", 1, "changed after the compile", lambda e: e.run(e.artifact(
        "llm", lambda a: (a / "manifest.json").write_text("{}")))),
    Case("run truncated embed table", 1, "embed_tokens.bin", lambda e: e.run(e.artifact(
        "llm", lambda a: _truncate(a / "embed_tokens.bin")))),
    Case("run flipped bit in embed table", 1, "sha256 differs", lambda e: e.run(e.artifact(
        "llm", lambda a: _flip(a / "embed_tokens.bin", 7)))),
    Case("run a failed artifact", 1, "parity check failed", lambda e: e.run(e.artifact(
        "llm", lambda a: _reseal(a, lambda d: d["parity"].update(passed=False))))),
    Case("run manifest shapes disagree", 1, "contract", lambda e: e.run(e.artifact(
        "llm", lambda a: _reseal(a, lambda d: d["llm"].update(prefill_len=80, max_context=112))))),
    Case("run missing image", 2, "does not exist", lambda e: e.run(None, None, "--image", str(e.tmp / "no.png"))),
    Case("run unreadable image", 2, "not a readable image", lambda e: e.run(
        None, None, "--image", e.config("not an image", "bad.png"))),
    Case("run unreadable video", 2, "not a readable video", lambda e: e.run(
        None, None, "--video", e.config("not a video", "bad.mp4"))),
    Case("run empty frames folder", 2, "no frame images", lambda e: e.run(
        None, None, "--video", str((e.tmp / "frames").mkdir() or e.tmp / "frames"))),
    Case("run fps 0", 2, "--fps", lambda e: e.run(None, None, "--fps", "0")),
    Case("run max-new-tokens 0", 2, "max_new_tokens", lambda e: e.run(None, None, "-n", "0")),
    Case("run parts swapped", 2, "not a 'llm' one", lambda e: e.run(e.artifact("visual"), e.artifact("llm"))),
    Case("run path with markup", 2, "[/]x[v2]", lambda e: e.run(e.tmp / "[/]x[v2]")),
    # ---- validate
    Case("validate missing folder", 2, "does not exist", lambda e: ["validate", str(e.tmp / "nope")]),
    Case("validate damaged manifest", 1, "changed after the compile", lambda e: ["validate", str(e.artifact(
        "llm", lambda a: (a / "manifest.json").write_text("[]")))]),
    Case("validate flipped bit in embed table", 1, "embed_tokens.bin: sha256", lambda e: ["validate", str(
        e.artifact("llm", lambda a: _flip(a / "embed_tokens.bin", 9)))]),
    Case("validate truncated visual weights", 1, "visual_weights.data", lambda e: ["validate", str(e.artifact(
        "visual", lambda a: _truncate(a / "visual_weights.data")))]),
]


def _latin1(e: Env) -> str:
    path = e.tmp / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    return str(path)


def _reseal_text(folder: Path, text: str) -> None:
    import hashlib

    (folder / "manifest.json").write_text(text)
    (folder / "manifest.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  manifest.json\n")


def test_the_table_is_wide():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    assert {c.code for c in CASES} == {1, 2, 3, 4, 130, 143}


@pytest.fixture(scope="module")
def artifacts(compiled) -> dict[str, Path]:
    off = {"enabled": False}
    return {"llm": compiled("rel_llm", validate=off, prefill_len=S, max_context=C).folder,
            "visual": compiled("rel_visual", part="visual", validate=off, max_patches=N).folder}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_or_fault(case: Case, tmp_path, monkeypatch, artifacts):
    from qvlc.checkpoint.tiny import tiny_checkpoint

    monkeypatch.setenv("QVLC_CACHE", str(Path(tiny_checkpoint()).parent))
    env = Env(tmp_path, monkeypatch, artifacts, tiny_checkpoint())
    argv = case.setup(env)
    res = CliRunner().invoke(app, argv)
    out = res.output
    assert res.exit_code == case.code, out
    assert "Traceback" not in out and not (res.exception and not isinstance(res.exception, SystemExit)), out
    assert case.fragment in out, out
    if case.code == 2 and argv[0] == "compile":
        assert "fix:" in out, out
    if env.out.exists():
        assert sorted(p.name for p in env.out.iterdir()) == sorted(case.left), "left behind"
    if getattr(env, "lock", None) is not None:
        env.lock.__exit__(None, None, None)
