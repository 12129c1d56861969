"""The first divergent layer: when a graph fails parity, the first layer (or vision block) whose output leaves
tolerance — the cause, where the parity table names only an output.

A *debug copy* of the graph is made in memory (the shipped file is not touched): the exporter records each node's
module scope (``pkg.torch.onnx.name_scopes``), so the residual output of layer i is the last ``Add`` directly in
scope ``stack.layers.i`` (``blocks.i`` for the vision tower); those values become extra graph outputs. ONNX
Runtime runs the copy on the failing case's inputs, transformers' own modules run the same case with their layer
outputs captured (``qvlc.validate.oracle`` / ``vision_oracle``), and the layers are compared in order at the
report's tolerance. tp > 1 LLM artifacts are not diagnosed (a rank graph's residual is cut by its reductions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx

from qvlc.precision import Runtime
from qvlc.runtime.sessions import open_session
from qvlc.validate.metrics import ParityReport, compare, passes
from qvlc.validate.ranges import RESIDUAL, RangeRecorder

SCOPES = {"llm": "stack.layers.", "visual": "blocks."}


def layer_outputs(path: Path, prefix: str) -> list[str]:
    """The value names of each layer's residual output in ``path``, in layer order."""
    model = onnx.load(str(path), load_external_data=False)
    last: dict[int, str] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if node.op_type != "Add" or not scopes:
            continue
        scopes = ast.literal_eval(scopes)
        if len(scopes) == 3 and scopes[1].startswith(prefix) and scopes[1][len(prefix):].isdigit():
            last[int(scopes[1][len(prefix):])] = node.output[0]
    return [last[i] for i in sorted(last)]


def run_debug_copy(path: Path, names: list[str], feeds: dict[str, np.ndarray],
                   runtime: Runtime = Runtime.ONNXRUNTIME) -> list[np.ndarray]:
    """Run a copy of the graph at ``path`` with ``names`` as extra outputs on ``runtime``; returns those values."""
    model = onnx.load(str(path), load_external_data=False)
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = open_session(model.SerializeToString(), path.parent, runtime)
    return session.run(names, feeds)


def first_divergent(report: ParityReport, graph_layers: list[np.ndarray], oracle_layers: list[np.ndarray],
                    names: list[str], case: str) -> None:
    """Compare layer by layer (fp32 arrays of the same real rows) and record the first that leaves tolerance."""
    tol = report.tolerance
    for name, got, ref in zip(names, graph_layers, oracle_layers):
        m = compare(ref, got.astype(np.float32))
        if not passes(m, tol):
            report.divergence = {"case": case, "runtime": str(report.runtime), "module": name, "max_abs": m["max_abs"], "rel_l2": m["rel_l2"],
                                 "cosine": m["cosine"], "layers_checked": len(names)}
            report.notes.append(f"first divergent layer{_on(report)}: {name} on {case} (max abs {m['max_abs']:.3e}, rel L2 "
                                f"{m['rel_l2']:.3e}, cosine {m['cosine']:.7f}); every layer before it agrees with "
                                "the oracle")
            return
    report.divergence = {"case": case, "runtime": str(report.runtime), "module": None, "layers_checked": len(names)}
    report.notes.append(f"first divergent layer{_on(report)}: none — all {len(names)} layers of {case} agree with the oracle "
                        "within tolerance; the divergence is after them (final norm, head, or the decode steps)")


def _on(report: ParityReport) -> str:
    return "" if report.runtime == Runtime.ONNXRUNTIME else f" on {report.runtime}"


class LayerCapture(RangeRecorder):
    """A recorder that keeps each layer's (or vision block's) output rows for one case instead of magnitudes:
    transformers' side of the layer-by-layer comparison, through the same hooks the range check uses."""

    def __init__(self, attn_name: str = "self_attn") -> None:
        super().__init__(attn_name)
        self.outputs: dict[str, np.ndarray] = {}

    def observe(self, module, kind, x, segments, rows_dim=0, whole=False) -> None:
        if kind != RESIDUAL or module.endswith("patch_embed"):
            return
        x = x.detach().float()
        if whole:  # a decoder layer: [1, T, H]
            self.outputs[module] = x[0].numpy().copy()
        else:  # a vision block, every case packed: the first case's rows
            _, a, b = segments[0]
            self.outputs[module] = x[a:b].numpy().copy()


def diagnose(report: ParityReport, path: Path, part: str, feeds: dict[str, np.ndarray], rows: np.ndarray,
             capture: LayerCapture, case: str) -> None:
    """Run the debug copy of ``path`` on ``feeds``, take ``rows`` of each layer output (the case's real rows, in
    the oracle's order), and compare with what ``capture`` kept from the oracle's run of the same case. The debug
    copy runs on the runtime being recorded (``report.runtime``): the one whose check failed."""
    names = layer_outputs(path, SCOPES[part])
    modules = sorted(capture.outputs, key=lambda m: int(m.rsplit(".", 1)[1]))
    if not names or len(names) != len(modules):
        report.notes.append(f"first divergent layer: not found ({len(names)} layer outputs in the graph's "
                            f"metadata, {len(modules)} layers in the oracle)")
        return
    got = [v.reshape(-1, v.shape[-1])[rows] for v in run_debug_copy(path, names, feeds, report.runtime)]
    first_divergent(report, got, [capture.outputs[m] for m in modules], modules, case)
