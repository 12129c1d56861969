"""Inputs made by someone hostile: downloaded artifacts and checkpoints, media and configs. Each test builds the
crafted input itself and asserts the documented outcome: nothing outside the output or artifact folder is created,
truncated, opened or hashed; no checkpoint code runs; every input is bounded before it is decoded or expanded;
user-derived text reaches the terminal without control characters."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from test_reliability import Case, Env, _reseal, _reseal_text, artifacts  # noqa: F401  (the fixture)
from typer.testing import CliRunner

from qvlc.artifact.hashing import sha256_file
from qvlc.cli.app import app
from qvlc.errors import QvlcError


def _lock_symlink(e: Env) -> list[str]:
    e.victim = e.tmp / "victim.txt"
    e.victim.write_text("precious")
    e.out.mkdir(parents=True)
    (e.out / ".x.lock").symlink_to(e.victim)
    return e.compile(e.llm())


def _playlist(e: Env) -> list[str]:
    path = e.tmp / "live.m3u8"
    path.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:99999\n#EXTINF:10,\n/etc/hostname\n")
    return e.run(None, None, "--video", str(path))


def _big_png(e: Env) -> list[str]:
    """A tiny file whose header claims 13000 x 13000 pixels (507 MB decoded)."""
    ihdr = struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path = e.tmp / "big.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return e.run(None, None, "--image", str(path))


def _alias_bomb(e: Env) -> list[str]:
    lol = '["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    text = (f"name: bomb\npart: llm\na: &a {lol}\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "export:\n  dtype: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n")
    return ["compile", e.config(text, "bomb.yaml")]


def _manifest(e: Env, edit, part: str = "llm") -> Path:
    return e.artifact(part, lambda a: _reseal(a, edit))


def _raw_manifest(e: Env, edit, part: str = "llm") -> Path:
    """Edit manifest.json's JSON itself (its file table too) and reseal its digest, as an attacker would."""
    def apply(a: Path) -> None:
        data = json.loads((a / "manifest.json").read_text())
        edit(data)
        _reseal_text(a, json.dumps(data))
    return e.artifact(part, apply)


def _files(*paths: str):
    def edit(d):
        d["files"] = d["files"] + [{"path": p, "bytes": 1, "sha256": "0" * 64} for p in paths]
    return edit


def _external_data(e: Env, location: str) -> list[str]:
    import onnx

    def edit(a: Path) -> None:
        m = onnx.load(str(a / "visual.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(m, str(a / "visual.onnx"))
        _reseal(a, lambda d: d.update(files=[dict(f, bytes=(a / f["path"]).stat().st_size,
                                                  sha256=sha256_file(a / f["path"])) for f in d["files"]]))
    return ["verify", str(e.artifact("visual", edit))]


def _symlinked_weights(e: Env) -> list[str]:
    def edit(a: Path) -> None:
        (e.tmp / "elsewhere").mkdir()
        target = e.tmp / "elsewhere" / "visual_weights.data"
        shutil.move(a / "visual_weights.data", target)
        (a / "visual_weights.data").symlink_to(target)
    return ["verify", str(e.artifact("visual", edit))]


def _auto_map(ck: Path) -> None:
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (ck / "tokenizer_config.json").write_text(json.dumps(cfg))
    (ck / "evil.py").write_text("import os\nos.system('touch /tmp/qvlc-pwned')\n")


def _slow_template(e: Env) -> list[str]:
    ck = e.tmp / "ck_template"
    shutil.copytree(e.tiny, ck)
    (ck / "chat_template.json").write_text(json.dumps({"chat_template": "{% for i in range(100000) %}{% for j in "
                                                       "range(100000) %}{% endfor %}{% endfor %}"}))
    e.mp.setattr("qvlc.runtime.template.TEMPLATE_SECONDS", 2.0)
    return e.run(None, None, "--checkpoint", str(ck))


def _bad_dtype_offsets(ck: Path) -> None:
    """The header says F64 where the byte range holds an F32 tensor (same header length: one token changed)."""
    path = next(ck.glob("*.safetensors"))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert b'"F32"' in header
    path.write_bytes(data[:8] + header.replace(b'"F32"', b'"F64"', 1) + data[8 + n:])


def _symlinked_artifact(e: Env) -> list[str]:
    real = e.tmp / "real_artifact"
    shutil.copytree(e.artifacts["llm"], real)
    e.out.mkdir(parents=True)
    (e.out / "x").symlink_to(real)
    return e.compile(e.llm(), "--force")


def _many_layers(ck: Path) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    cfg.setdefault("text_config", {})["num_hidden_layers"] = 20000
    cfg["num_hidden_layers"] = 20000
    (ck / "config.json").write_text(json.dumps(cfg))


def _escaping_index(ck: Path) -> None:
    single = ck / "model.safetensors"
    if single.exists():
        header = json.loads(single.read_bytes()[8:8 + int.from_bytes(single.read_bytes()[:8], "little")])
        wm = {k: "model.safetensors" for k in header if k != "__metadata__"}
    else:
        wm = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    wm[next(iter(wm))] = "../../outside.safetensors"
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _visual_from(e: Env, edit) -> list[str]:
    """A visual compile from a copy of the tiny checkpoint after ``edit``: its processor configs are read."""
    ck = e.tmp / "ck_json"
    shutil.copytree(e.tiny, ck)
    edit(ck)
    return e.compile({"name": "x", "part": "visual", "model": {"checkpoint": str(ck)},
                      "export": {"max_patches": 256}})


def _run_with(e: Env, edit) -> list[str]:
    """`qvlc run --checkpoint` a copy of the tiny checkpoint after ``edit``: its tokenizer files are read."""
    ck = e.tmp / "ck_tok"
    shutil.copytree(e.tiny, ck)
    edit(ck)
    return e.run(None, None, "--checkpoint", str(ck))


def _write(name: str, data: bytes):
    return lambda ck: (ck / name).write_bytes(data)


def _preprocess_json(e: Env, data: bytes) -> list[str]:
    """A visual artifact whose preprocess.json was replaced and the manifest resealed (its digest passes)."""
    def edit(a: Path) -> None:
        (a / "preprocess.json").write_bytes(data)
        _reseal(a, lambda d: None)

    return e.run(None, e.artifact("visual", edit))


HOSTILE = [
    Case("lock_is_a_symlink", 2, "not a plain lock file", _lock_symlink, (".x.lock",)),
    Case("video_playlist", 2, "not a container qvlc reads", _playlist),
    Case("image_13000_squared", 2, "13000x13000", _big_png),
    Case("yaml_alias_bomb", 2, "aliases", _alias_bomb),
    Case("manifest_tp_3000000", 1, "tp is 3000000", lambda e: e.run(_manifest(e, lambda d: d["llm"].update(
        tp=3000000)))),
    Case("manifest_path_parent", 1, "not a plain relative path", lambda e: ["verify", str(_raw_manifest(
        e, _files("../outside.txt")))]),
    Case("manifest_path_absolute", 1, "not a plain relative path", lambda e: ["verify", str(_raw_manifest(
        e, _files("/etc/passwd")))]),
    Case("manifest_path_twice", 1, "listed twice", lambda e: ["verify", str(_raw_manifest(
        e, lambda d: d.update(files=d["files"] + d["files"][:1])))]),
    Case("external_data_parent", 1, "names external data", lambda e: _external_data(e, "../elsewhere/w.data")),
    Case("external_data_absolute", 1, "names external data", lambda e: _external_data(e, "/etc/passwd")),
    Case("weights_file_symlink_out", 1, "a symlink", _symlinked_weights),
    Case("tokenizer_auto_map", 2, "auto_map", lambda e: e.checkpoint(_auto_map)),
    Case("chat_template_hangs", 2, "chat template", _slow_template),
    Case("manifest_nested_deep", 1, "nested too deeply", lambda e: ["verify", str(e.artifact(
        "llm", lambda a: _reseal_text(a, "[" * 200000 + "]" * 200000)))]),
    Case("safetensors_dtype_vs_offsets", 2, "malformed safetensors header", lambda e: e.checkpoint(
        _bad_dtype_offsets)),
    Case("force_onto_symlinked_artifact", 2, "is a symlink", _symlinked_artifact, ("x",)),
    Case("config_20000_layers", 2, "text.layers = 20000", lambda e: e.checkpoint(_many_layers)),
    Case("index_names_a_parent_path", 2, "outside the checkpoint folder", lambda e: e.checkpoint(_escaping_index)),
    # every JSON file of a checkpoint goes through one reader: exit 2 naming the file, never exit 4
    Case("preprocessor_config_not_utf8", 2, "preprocessor_config.json is not UTF-8", lambda e: _visual_from(
        e, _write("preprocessor_config.json", b"\xff\xfe{}"))),
    Case("preprocessor_config_an_array", 2, "holds a JSON list", lambda e: _visual_from(
        e, _write("preprocessor_config.json", b"[1]"))),
    Case("preprocessor_config_wrong_type", 2, 'min_pixels is "many"', lambda e: _visual_from(
        e, _write("preprocessor_config.json", b'{"min_pixels": "many"}'))),
    Case("video_preprocessor_nested_deep", 2, "nested too deeply", lambda e: _visual_from(
        e, _write("video_preprocessor_config.json", b"[" * 100_000 + b"]" * 100_000))),
    Case("config_json_an_array", 2, "config.json holds a JSON list", lambda e: e.checkpoint(
        _write("config.json", b"[1, 2]"))),
    Case("index_unterminated", 2, "model.safetensors.index.json is not valid JSON", lambda e: e.checkpoint(
        _write("model.safetensors.index.json", b'{"weight_map": {"a": "b'))),
    Case("run_preprocessor_config_an_array", 2, "preprocessor_config.json holds a JSON list", lambda e: _run_with(
        e, _write("preprocessor_config.json", b"[1]"))),
    Case("run_chat_template_a_number", 2, "chat_template is 5", lambda e: _run_with(
        e, _write("chat_template.json", b'{"chat_template": 5}'))),
    Case("preprocess_json_an_array", 1, "preprocess.json is not a preprocessing config", lambda e: _preprocess_json(
        e, b"[1]")),
    Case("preprocess_json_wrong_type", 1, "preprocess.json is not a preprocessing config", lambda e: _preprocess_json(
        e, b'{"merge_size": "two"}')),
    Case("run_tokenizer_config_not_utf8", 2, "tokenizer_config.json is not UTF-8", lambda e: _run_with(
        e, _write("tokenizer_config.json", b"\x80abc"))),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_input(case: Case, tmp_path, monkeypatch, artifacts):  # noqa: F811
    from qvlc.checkpoint.tiny import tiny_checkpoint

    monkeypatch.setenv("QVLC_CACHE", str(Path(tiny_checkpoint()).parent))
    env = Env(tmp_path, monkeypatch, artifacts, tiny_checkpoint())
    argv = case.setup(env)
    t0 = time.monotonic()
    res = CliRunner().invoke(app, argv)
    out = res.output
    assert res.exit_code == case.code, out
    assert "Traceback" not in out and not (res.exception and not isinstance(res.exception, SystemExit)), out
    assert case.fragment in out, out
    assert time.monotonic() - t0 < 60 and len(out) < 4000, "bounded in time and words"
    if env.out.exists():
        assert sorted(p.name for p in env.out.iterdir()) == sorted(case.left), "left behind"
    if hasattr(env, "victim"):
        assert env.victim.read_text() == "precious"
    assert not Path("/tmp/qvlc-pwned").exists()


def test_terminal_escapes_in_a_manifest_path_are_shown_escaped(tmp_path, monkeypatch, artifacts):  # noqa: F811
    env = Env(tmp_path, monkeypatch, artifacts, None)
    folder = _raw_manifest(env, _files("\x1b[2K\r✓ all good"))
    res = CliRunner().invoke(app, ["verify", str(folder)])
    assert res.exit_code == 1 and "\x1b" not in res.output and "\\x1b[2K" in res.output, repr(res.output)


def test_expect_digest_pins_an_artifact(tmp_path, monkeypatch, artifacts):  # noqa: F811
    env = Env(tmp_path, monkeypatch, artifacts, None)
    folder = env.artifact("llm")
    digest = (folder / "manifest.sha256").read_text().split()[0]
    assert CliRunner().invoke(app, ["verify", str(folder), "--expect-digest", digest.upper()]).exit_code == 0
    _reseal(folder, lambda d: d.update(qvlc_version=d["qvlc_version"] + "+edited"))  # resealed: digest passes
    assert CliRunner().invoke(app, ["verify", str(folder)]).exit_code == 0
    res = CliRunner().invoke(app, ["verify", str(folder), "--expect-digest", digest])
    assert res.exit_code == 1 and "not the artifact that was pinned" in res.output
    res = CliRunner().invoke(app, env.run(folder, None, "--expect-digest", digest))
    assert res.exit_code == 1 and "--expect-digest" in res.output
    assert CliRunner().invoke(app, ["verify", str(folder), "--expect-digest", "xyz"]).exit_code == 2


def _clip(path: Path, frames: int, w: int = 64, h: int = 48) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full((h, w, 3), (i * 7) % 256, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_only_sampled_frames_are_decoded_and_kept(tmp_path, monkeypatch):
    from qvlc.runtime import media

    path = _clip(tmp_path / "c.mp4", 60)
    with av.open(str(path)) as c:  # the old way: every frame, then sampled
        every = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    keep = media.sample_indices(len(every), 10.0, 2, 1.0)
    video = media.load_video(path, temporal_patch_size=2, fps=1.0)
    assert len(video.frames) == len(keep) < len(every)
    assert all(np.array_equal(a, every[i]) for a, i in zip(video.frames, keep))
    monkeypatch.setattr(media, "MAX_VIDEO_BYTES", 64 * 48 * 3 * (len(keep) - 1))
    with pytest.raises(QvlcError, match="--fps"):
        media.load_video(path, temporal_patch_size=2, fps=1.0)


def test_default_opset_is_the_lowest_that_expresses_the_graphs():
    from qvlc.compile.plan import checked_plan
    from qvlc.config.loading import config_from_dict

    def opset(**export):
        return checked_plan(config_from_dict({"name": "o", "part": "llm", "export": export})).cfg.export.opset

    assert opset() == 18
    assert opset(weights={"format": "int8"}) == 19
    assert opset(weights={"format": "int4", "group_size": 32}) == 21
    assert opset(weights={"format": "int4", "group_size": 32, "dequantize": "explicit"}) == 19
    assert opset(opset=20) == 20
    with pytest.raises(QvlcError, match="opset >= 21"):
        opset(opset=18, weights={"format": "int4", "group_size": 32})


@pytest.mark.parametrize("sig,code", [(15, 143), (2, 130)])
def test_a_signal_ends_a_command_stuck_in_library_code(tmp_path, artifacts, sig, code):  # noqa: F811
    """The main thread blocked in one C call that never returns (here time.sleep standing in for an FFmpeg read):
    the signal still ends the command within the grace period, with its exit code and one line, no traceback."""
    import os
    import signal
    import subprocess
    import sys

    clip, stuck = _clip(tmp_path / "c.mp4", 8), tmp_path / "stuck"
    code_text = ("import qvlc.system.signals as w; w.block(); import time, pathlib, qvlc.runtime.media as m; "  # as entry
                 f"m.container_format = lambda p: (pathlib.Path({str(stuck)!r}).touch(), time.sleep(600)); "
                 "from qvlc.cli.app import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", code_text, "run", str(artifacts["llm"]), str(artifacts["visual"]),
                             "--video", str(clip), "--prompt", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "QVLC_CACHE": str(tmp_path / "cache")},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180  # past the artifact checks, into the stuck call (slow on a loaded machine)
    while not stuck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not stuck.exists():
        proc.kill()  # not left sleeping behind a failed test
        pytest.fail(f"never reached the stuck call: {proc.communicate()[1]}")
    time.sleep(0.5)  # inside the sleep, not on its way to it
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and time.monotonic() - t0 < 15, err
    assert "did not return" in err and "Traceback" not in err, err
