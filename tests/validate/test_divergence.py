"""The first divergent layer: a weight perturbed inside one layer (or vision block) of a compiled tiny artifact
fails parity, and `qvlc validate` names that layer — not an earlier one, and not just an output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qvlc.compile.stages import validate_artifact
from qvlc.validate.divergence import layer_outputs

CASES = {  # part → (graph file, initializer prefix, transformers' name prefix of the layer)
    "llm": ("llm_prefill.onnx", "stack.layers.{}.mlp.down_proj.weight_t", "model.language_model.layers.{}"),
    "visual": ("visual.onnx", "blocks.{}.mlp.fc2.weight_t", "model.visual.blocks.{}"),
}


def perturb(folder, graph: str, name: str, factor: float = 1.5) -> None:
    """Scale one external initializer in place (prefill and decode share the weights file)."""
    init = next(i for i in onnx.load(str(folder / graph), load_external_data=False).graph.initializer
                if i.name == name)
    ext = {e.key: e.value for e in init.external_data}
    path, offset, length = folder / ext["location"], int(ext["offset"]), int(ext["length"])
    data = bytearray(path.read_bytes())
    w = np.frombuffer(bytes(data[offset:offset + length]), np.float32) * factor
    data[offset:offset + length] = w.astype(np.float32).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part,layer", [("llm", 1), ("llm", 0), ("visual", 1)])
def test_validate_names_the_first_divergent_layer(compiled, copy_artifact, reseal, part, layer):
    r = compiled(f"div_{part}", part=part, **({"prefill_len": 64, "max_context": 96} if part == "llm" else {}))
    assert r.report.passed and r.report.divergence is None
    graph, init, module = CASES[part]
    folder = copy_artifact(r.folder)
    perturb(folder, graph, init.format(layer))
    reseal(folder)
    report = validate_artifact(folder)
    assert not report.passed
    assert report.divergence["module"] == module.format(layer), report.divergence
    assert any(f"first divergent layer: {module.format(layer)}" in n for n in report.notes)
    assert report.cause.startswith(f"first divergent layer: {module.format(layer)} on ")


def test_cli_validate_prints_the_cause(compiled, copy_artifact, reseal):
    import os
    import subprocess
    import sys

    r = compiled("div_visual", part="visual")
    folder = copy_artifact(r.folder)
    perturb(folder, "visual.onnx", CASES["visual"][1].format(1))
    reseal(folder)
    proc = subprocess.run([sys.executable, "-m", "qvlc", "validate", str(folder)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "first divergent layer: model.visual.blocks.1 on " in " ".join(proc.stderr.split())


def test_layer_outputs_come_from_the_exporters_scopes(compiled):
    r = compiled("div_llm", part="llm", prefill_len=64, max_context=96)
    names = layer_outputs(r.folder / "llm_prefill.onnx", "stack.layers.")
    config = json.loads((r.folder / "manifest.json").read_text())["llm"]
    assert len(names) == config["layers"] and len(set(names)) == len(names)
