"""Each defect the fuzzers found (issue 30), reproduced by the input that found it: before the fix each ended as
exit 4 ("a bug in qvlc") or HTTP 500, or named no file."""

from __future__ import annotations

import json

import pytest
from serve_properties import BASE, check_answer, client
from surfaces import expect, outcome, split_safetensors, with_header
from test_fuzz import ws  # noqa: F401  (the fixture)

from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.processor import preprocess_config
from qvlc.eval.bench_data import read_items
from qvlc.runtime.artifact import read_preprocess


def _plan(ck):
    from qvlc.compile.plan import checked_plan
    from qvlc.config.loading import config_from_dict

    return checked_plan(config_from_dict({"name": "f", "part": "llm", "model": {"checkpoint": str(ck)},
                                          "export": {"prefill_len": 128, "max_context": 256}}))


def _edit_config(ws, edit) -> None:  # noqa: F811
    path = ws.tiny / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    ws.write(path, json.dumps(cfg).encode())


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: [d.update(initializer_range={"a": 1}) for d in (c, c.get("text_config") or {}, c["vision_config"])],
     "config.json: transformers cannot build the model"),
    (lambda c: c.update(text_config=[1]), "config.json is missing or has a malformed"),
    (lambda c: c.pop("model_type"), "config.json: model_type 'None'"),
])
def test_config_json_fields_transformers_cannot_take(ws, edit, fragment):  # noqa: F811
    try:
        _edit_config(ws, edit)
        o = outcome(lambda: _plan(ws.tiny))
        expect(o, {2})
        assert fragment in o.messages[0], o.messages
    finally:
        ws.restore()


@pytest.mark.parametrize("name, data, fragment", [
    ("preprocessor_config.json", b'{"min_pixels": 0}', "preprocessor_config.json: min_pixels=0"),
    ("model.safetensors.index.json", b'{"weight_map": {}}', "lists no weight files"),
])
def test_checkpoint_files_are_named(ws, name, data, fragment):  # noqa: F811
    def run() -> None:
        _plan(ws.tiny)
        fam, dims = inspect_checkpoint(ws.tiny)
        preprocess_config(ws.tiny, dims.vision, fam.video_rules)

    try:
        ws.write(ws.tiny / name, data)
        o = outcome(run)
        expect(o, {2}, (name,))
        assert fragment in o.messages[0], o.messages
    finally:
        ws.restore()


def test_a_deeply_nested_safetensors_header(ws):  # noqa: F811
    path = ws.tiny / "model.safetensors"
    _, body = split_safetensors(path)
    try:
        ws.write(path, with_header(b"[" * 5000 + b"]" * 5000, body))
        o = outcome(lambda: _plan(ws.tiny))
        expect(o, {2}, ("model.safetensors",))
        assert "nested too deeply" in o.messages[0]
    finally:
        ws.restore()


def test_a_safetensors_shape_of_true_is_not_a_dimension(ws):  # noqa: F811
    """A header dimension written as JSON ``true`` (Python's 1) passed as a shape and was refused naming no file."""
    path = ws.tiny / "model.safetensors"
    header, body = split_safetensors(path)
    name = next(k for k, t in header.items() if k != "__metadata__" and len(t["shape"]) == 1)
    header[name]["shape"] = header[name]["shape"] + [True]
    try:
        ws.write(path, with_header(json.dumps(header).encode(), body))
        o = outcome(lambda: _plan(ws.tiny))
        expect(o, {2}, ("model.safetensors",))
        assert "malformed safetensors header" in o.messages[0], o.messages
    finally:
        ws.restore()


@pytest.mark.parametrize("data", [b'{"image_std": null}', b'{"image_mean": {"a": 1}}', b'{"rescale_factor": "x"}',
                                  b'{"max_pixels": 1e300}'])
def test_a_resealed_preprocess_json_of_the_wrong_types(ws, data):  # noqa: F811
    try:
        ws.write(ws.visual / "preprocess.json", data)
        ws.reseal(ws.visual)
        o = outcome(lambda: read_preprocess(ws.visual))
        expect(o, {1}, ("preprocess.json",))
    finally:
        ws.restore()


def test_an_eval_jsonl_that_is_not_utf8(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n\xfb\xff\n')
    o = outcome(lambda: read_items(path))
    expect(o, {2}, ("b.jsonl, line 2",))


@pytest.mark.parametrize("body", [
    json.dumps({**BASE, "messages": [{"role": [], "content": "hi"}]}).encode(),
    json.dumps({**BASE, "messages": [{"role": {"a": 1}, "content": "hi"}]}).encode(),
    b"[" * 5000 + b"]" * 5000,
    json.dumps({**BASE, "n": [[[[[[[[[[1]]]]]]]]]]}).encode(),
])
def test_request_bodies_that_were_answered_500(ws, body):  # noqa: F811
    r = client(ws).post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    check_answer(r)
    assert r.status_code == 400


def test_a_bug_is_answered_in_openai_shape_with_no_traceback_in_the_output(ws, monkeypatch, capfd):  # noqa: F811
    import qvlc.serve.app as app_module

    def boom(*_a):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(app_module, "parse_chat_request", boom)
    r = client(ws).post("/v1/chat/completions", content=json.dumps(BASE).encode())
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "the traceback is in" in r.json()["error"]["message"]
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err


def test_a_tiff_whose_strip_offsets_are_rationals():
    """Pillow raised TypeError (not OSError) for a TIFF whose StripOffsets tag has type RATIONAL: exit 4 before."""
    import io
    import struct

    import numpy as np
    from PIL import Image

    from qvlc.runtime.media import open_image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 40, 3), np.uint8)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for i in range(struct.unpack(order + "H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack(order + "H", data[entry:entry + 2])[0] == 273:  # StripOffsets
            data[entry + 2:entry + 4] = struct.pack(order + "H", 5)  # type RATIONAL
    o = outcome(lambda: open_image(bytes(data), what="upload.tif"))
    expect(o, {2}, ("upload.tif",))
    assert "not a readable image" in o.messages[0]
