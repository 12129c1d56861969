"""`qvlc compile` of the LLM part on the tiny default: artifacts, contract, parity, and what must fail."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from qvlc.artifact.trust import verify
from qvlc.checkpoint.hf_model import load_checkpoint
from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.cli.app import app
from qvlc.compile.stages import compile_artifact, validate_artifact
from qvlc.config.loading import config_from_dict
from qvlc.errors import ParityError, QvlcError

S, C = 64, 128


@pytest.fixture(scope="module")
def fp32(compiled):
    return compiled("llm_fp32", prefill_len=S, max_context=C)


def test_parity_passes_with_every_case(fp32):
    r = fp32.report
    assert r.passed, r.failures
    cases = {c.case.split("/")[0] for c in r.checks}
    assert {"text_short", "one_image_half", "two_images_full", "image_and_video"} <= cases
    assert sum(1 for c in r.checks if c.graph == "decode" and c.output == "logits") == 4 * 15  # max(decode_steps 8, 16 - 1)
    assert [(t.case, t.matched, len(t.expected)) for t in r.tokens] == \
        [(n, 16, 16) for n in ("text_short", "one_image_half", "two_images_full", "image_and_video")]
    assert max(c.metrics["max_abs"] for c in r.checks) < 1e-4


def test_artifact_layout_and_contract(fp32):
    folder = fp32.folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".qvlc-artifact", "embed_tokens.bin", "llm_decode.onnx", "llm_prefill.onnx", "llm_weights.data",
                     "manifest.json", "manifest.sha256", "parity.json", "parity.md"]
    m = json.loads((folder / "manifest.json").read_text())
    graphs = {g["file"]: g for g in m["graphs"]}
    pre, dec = graphs["llm_prefill.onnx"], graphs["llm_decode.onnx"]
    L, kvh, D, H, V = 2, 2, 16, 64, 1024
    io = lambda rows: [(r["name"], r["shape"], r["dtype"]) for r in rows]  # noqa: E731
    assert io(pre["inputs"]) == [("inputs_embeds", [1, S, H], "float32"), ("attention_mask", [1, S], "int64"),
                                 ("cos", [1, 1, S, D], "float32"), ("sin", [1, 1, S, D], "float32")]
    assert io(pre["outputs"]) == [("logits", [1, 1, V], "float32"),
                                  ("present_key_values", [L, 2, 1, kvh, S, D], "float32")]
    assert io(dec["inputs"])[1:] == [("attention_mask", [1, C], "int64"), ("cos", [1, 1, 1, D], "float32"),
                                     ("sin", [1, 1, 1, D], "float32"),
                                     ("past_key_values", [L, 2, 1, kvh, C - 1, D], "float32")]
    assert io(dec["outputs"])[1] == ("present_key_values", [L, 2, 1, kvh, 1, D], "float32")
    assert m["parity"]["passed"] is True and m["source"]["checkpoint"] == "tiny"
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m["libraries"])
    assert m["source"]["weights"][0]["file"] == "model.safetensors"
    assert verify(folder).problems == []


def test_embed_table_is_the_hf_embedding(fp32):
    ck = load_checkpoint(tiny_checkpoint())
    ref = ck.text_model.embed_tokens.weight.detach().numpy()
    got = np.fromfile(fp32.folder / "embed_tokens.bin", dtype="<f4").reshape(ref.shape)
    np.testing.assert_array_equal(got, ref)


def test_prefill_and_decode_share_one_weights_file(fp32):
    folder = fp32.folder
    locations = set()
    for name in ("llm_prefill.onnx", "llm_decode.onnx"):
        model = onnx.load(str(folder / name), load_external_data=False)
        ext = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert len(ext) >= 2 * 7  # every large weight of both layers is external
        locations |= {kv.value for t in ext for kv in t.external_data if kv.key == "location"}
    assert locations == {"llm_weights.data"}
    # Written once: the file holds the unique weights, half of what two per-graph files would hold.
    assert fp32.export.weights_unshared_bytes >= 1.9 * (folder / "llm_weights.data").stat().st_size * 0.99


def test_fp16_compiles_and_reports_token_agreement(compiled):
    r = compiled("llm_fp16", prefill_len=S, max_context=C, dtype="fp16")
    assert r.report.passed, r.report.failures
    assert not any(t.required for t in r.report.tokens)  # fp16 reports agreement, fp32 must match
    table = np.fromfile(r.folder / "embed_tokens.bin", dtype="<f2")
    assert table.size == 1024 * 64
    m = json.loads((r.folder / "manifest.json").read_text())
    assert m["graphs"][0]["inputs"][0]["dtype"] == "float16"
    assert m["graphs"][0]["outputs"][0]["dtype"] == "float32"  # logits stay fp32


def _perturb(folder, tensor_suffix: str, delta: float) -> None:
    """Add ``delta`` to one weight tensor inside llm_weights.data (both graphs read it)."""
    model = onnx.load(str(folder / "llm_prefill.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name.endswith(tensor_suffix))
    info = {kv.key: kv.value for kv in t.external_data}
    off, n = int(info["offset"]), int(info["length"])
    data = np.memmap(folder / "llm_weights.data", dtype=np.uint8, mode="r+")
    w = data[off:off + n].view("<f4")
    w += np.float32(delta)
    data.flush()


def test_one_perturbed_weight_is_caught(fp32, copy_artifact, reseal):
    folder = copy_artifact(fp32.folder)
    _perturb(folder, "layers.1.mlp.down_proj.weight_t", 1e-2)
    with pytest.raises(QvlcError, match="llm_weights.data: sha256 differs"):  # the integrity check sees it first
        validate_artifact(folder)
    reseal(folder)  # a consistent artifact with a wrong weight: parity must see it
    report = validate_artifact(folder)
    assert not report.passed
    failed = {(c.graph, c.output) for c in report.checks if not c.passed}
    assert ("prefill", "logits") in failed and ("decode", "logits") in failed
    assert any(not t.passed for t in report.tokens) or len(report.failures) > 10


def test_failed_parity_publishes_nothing(tmp_path, monkeypatch):
    from qvlc.runtime.llm import LlmRuntime

    real = LlmRuntime.prefill

    def off_by_one_percent(self, *args):
        return [{**o, "logits": o["logits"] * 1.01} for o in real(self, *args)]

    monkeypatch.setattr(LlmRuntime, "prefill", off_by_one_percent)
    cfg = config_from_dict({"name": "bad", "part": "llm", "export": {"prefill_len": S, "max_context": C},
                            "validate": {"decode_steps": 1, "generate_tokens": 2}, "output": {"dir": str(tmp_path)}})
    with pytest.raises(ParityError) as info:
        compile_artifact(cfg)
    assert "prefill/text_short/logits" in str(info.value)
    assert not (tmp_path / "bad").exists()
    assert (tmp_path / "bad.failed" / "parity.md").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_interrupted_compile_leaves_no_folder(tmp_path, monkeypatch):
    import qvlc.compile.stages as pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "validate", boom)
    cfg = config_from_dict({"name": "cut", "part": "llm", "export": {"prefill_len": S, "max_context": C},
                            "output": {"dir": str(tmp_path)}})
    with pytest.raises(KeyboardInterrupt):
        compile_artifact(cfg)
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_needs_force(fp32):
    cfg = config_from_dict({"name": fp32.folder.name, "part": "llm",
                            "export": {"prefill_len": S, "max_context": C},
                            "output": {"dir": str(fp32.folder.parent)}})
    with pytest.raises(QvlcError, match="--force"):
        compile_artifact(cfg)


def test_same_inputs_give_byte_identical_artifacts(fp32, tmp_path):
    cfg = config_from_dict({"name": fp32.folder.name, "part": "llm", "export": {"prefill_len": S, "max_context": C},
                            "output": {"dir": str(tmp_path)}})
    again = compile_artifact(cfg)
    a = json.loads((fp32.folder / "manifest.json").read_text())
    b = json.loads((again.folder / "manifest.json").read_text())
    assert a["files"] == b["files"]


def test_cli_compile_simplify_verify_and_exit_codes(tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: cli\npart: llm\nexport:\n  prefill_len: {S}\n  max_context: {C}\n  simplify: true\n"
                   f"validate:\n  decode_steps: 2\n  generate_tokens: 4\noutput:\n  dir: {tmp_path}\n")
    res = runner.invoke(app, ["compile", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "parity vs transformers" in res.output and "FAIL" not in res.output
    assert runner.invoke(app, ["verify", str(tmp_path / "cli")]).exit_code == 0
    with open(tmp_path / "cli" / "llm_weights.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    res = runner.invoke(app, ["verify", str(tmp_path / "cli")])
    assert res.exit_code == 1 and "sha256 differs" in res.output
    res = runner.invoke(app, ["compile", str(cfg)])
    assert res.exit_code == 2 and "--force" in res.output


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\npart: llm\nexport:\n  prefil_len: 100\n")
    res = CliRunner().invoke(app, ["compile", str(cfg)])
    assert res.exit_code == 2
    assert "did you mean 'prefill_len'" in res.output and "Traceback" not in res.output


def test_staging_of_a_killed_compile_is_removed_next_time(tmp_path):
    import subprocess
    import sys

    from qvlc.artifact.publish import make_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".art.staging-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / ".qvlc-artifact").write_text("")
    foreign = tmp_path / f".art.staging-{int(dead.stdout)}-def"  # same pattern, but not qvlc's: never touched
    foreign.mkdir()
    live = tmp_path / f".art.staging-{1}-xyz"  # pid 1 is alive: never touched
    live.mkdir()
    (live / ".qvlc-artifact").write_text("")
    mine = make_staging(tmp_path / "art")
    assert not stale.exists() and foreign.exists() and live.exists() and mine.exists()


def test_validate_refuses_a_different_checkpoint(fp32, copy_artifact, reseal):
    folder = copy_artifact(fp32.folder)
    reseal(folder, lambda m: m["source"]["weights"][0].update(sha256="0" * 64))
    with pytest.raises(QvlcError, match="not the one"):
        validate_artifact(folder)
