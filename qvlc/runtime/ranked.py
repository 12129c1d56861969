"""Run tensor-parallel rank graphs without a collective library: the ranked runner that proves them.

ONNX Runtime has no ``qvlc.AllReduce`` kernel, so each rank graph is cut at its reduction points into segments (in
memory; the weights stay in the rank's file): all ranks run segment k, the partial results are summed — exactly
what the node promises a runtime will do — and the sum feeds segment k + 1 on every rank. The final segment of
each rank yields its vocab slice of the logits and its own KV heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.utils

from qvlc.parallel.allreduce import DOMAIN, OP_TYPE, register_onnx_schema
from qvlc.precision import Runtime
from qvlc.runtime.sessions import open_session
from qvlc.system.malloc import heap_reuse


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def split_at_allreduce(path: Path) -> tuple[list[onnx.ModelProto], list[str]]:
    """Cut a rank graph at its qvlc.AllReduce nodes. Segment k < n outputs the k-th reduction's input; the last
    segment outputs the graph outputs. Segments read the sums of earlier reductions as inputs named after the
    AllReduce outputs, which are returned in order. Weights stay external (nothing is loaded)."""
    register_onnx_schema()
    model = onnx.load(str(path), load_external_data=False)
    reduces = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    if not reduces:
        return [model], []
    infos = _value_infos(model)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    keep = [n for n in cut.graph.node if not (n.op_type == OP_TYPE and n.domain == DOMAIN)]
    del cut.graph.node[:]
    cut.graph.node.extend(keep)
    for n in reduces:
        src = infos.get(n.input[0])
        if src is None:
            raise ValueError(f"{path}: no type information for AllReduce input {n.input[0]!r}")
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(src)
        vi.name = n.output[0]
        cut.graph.input.append(vi)
    extractor = onnx.utils.Extractor(cut)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    segments = []
    for k in range(len(reduces) + 1):
        ins = inputs + [r.output[0] for r in reduces[:k]]
        outs = [reduces[k].input[0]] if k < len(reduces) else outputs
        segments.append(extractor.extract_model(ins, outs))
    return segments, [r.output[0] for r in reduces]


class RankedGraph:
    """One graph (prefill or decode) over all tensor-parallel ranks, with AllReduce run as a sum."""

    def __init__(self, paths: list[Path], runtime: Runtime = Runtime.ONNXRUNTIME) -> None:
        self.paths = paths
        self.segments: list[list] = []  # [rank][segment]: sessions (ONNX Runtime's or TVM's)
        reduce_names = []
        for p in paths:
            segments, names = split_at_allreduce(p)
            self.segments.append([open_session(seg.SerializeToString(), p.parent, runtime) for seg in segments])
            reduce_names.append(names)
        if any(n != reduce_names[0] for n in reduce_names):
            raise ValueError(f"rank graphs {[str(p) for p in paths]} have different reduction points")
        self.reduce_names: list[str] = reduce_names[0]  # AllReduce outputs, in graph order

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """``feeds[r]``: rank r's inputs. Returns each rank's outputs by name."""
        return self.run_many([feeds])[0]

    def run_many(self, items: list[list[dict[str, np.ndarray]]]) -> list[list[dict[str, np.ndarray]]]:
        """Several independent calls (``items[i][r]``: call i's inputs on rank r) run segment-major: each segment
        of each rank runs every call before the next segment starts, so a rank's weights are read once for all
        the calls, not once per call (validation's decode steps: one call per prompt). Each call's results are
        exactly what ``run`` gives it alone. ONNX Runtime's buffers come from the heap meanwhile (``heap_reuse``:
        an fp16 weight's per-call fp32 cast reuses the last one's pages), handed back when the calls are done."""
        with heap_reuse():
            return self._run_many(items)

    def _run_many(self, items: list[list[dict[str, np.ndarray]]]) -> list[list[dict[str, np.ndarray]]]:
        sums: list[dict[str, np.ndarray]] = [{} for _ in items]
        n_seg = len(self.segments[0])
        results: list[list[dict[str, np.ndarray]]] = [[{} for _ in self.segments] for _ in items]
        for k in range(n_seg):
            partial: list[list[np.ndarray]] = [[] for _ in items]
            for r, sessions in enumerate(self.segments):
                sess = sessions[k]
                names, outs = [i.name for i in sess.get_inputs()], sess.get_outputs()
                for i, feeds in enumerate(items):
                    avail = {**feeds[r], **sums[i]}
                    out = sess.run(None, {n: avail[n] for n in names})
                    if k < n_seg - 1:
                        partial[i].append(out[0])
                    else:
                        results[i][r] = {o.name: v for o, v in zip(outs, out)}
            if k < n_seg - 1:
                for i, parts in enumerate(partial):
                    sums[i][self.reduce_names[k]] = _allreduce(parts)
        return results


def _allreduce(partial: list[np.ndarray]) -> np.ndarray:
    """What a qvlc.AllReduce promises: every rank receives the sum of all ranks' partial results (in fp32, cast
    back to the partials' dtype)."""
    reduced = partial[0].astype(np.float32)
    for p in partial[1:]:
        reduced = reduced + p.astype(np.float32)
    return reduced.astype(partial[0].dtype)
