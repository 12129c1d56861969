"""Apache TVM as a second runtime: a qvlc graph imported by TVM's Relax ONNX frontend, built for this CPU
(``llvm``), and run behind the part of ONNX Runtime's session interface qvlc uses (``run``, ``get_inputs``,
``get_outputs``). An optional extra: ``pip install "qvlc[tvm]"``.

Why it is in the proof: ONNX Runtime's CPU provider casts fp16 MatMuls to fp32, so on it an fp16 graph shows fp16
*storage*. TVM computes what the graph says in the graph's types — fp16 products, fp16 running sums, fp16
elementwise ops — which is what a chip without fp32 accumulators does, and what the vendor compiler qvlc replaces
(built on TVM) produces. fp32 graphs agree with ONNX Runtime to ~1e-7.

Speed. Relax lowers every operator to a plain loop nest; nothing is scheduled for a CPU unless a rule does it.
Measured on this machine's 2 vCPUs: one [64, 4096] x [4096, 512] fp16 MatMul ran at 0.086 GFLOP/s as built by
default — the generic x86-64 target has no F16C, so every fp16 value goes through a conversion call. Targeting the
host CPU (``mcpu``) gives the conversions in hardware; TVM sizes its thread pool by physical cores (one here), so
the session asks for every vCPU; and the one schedule below (reduction loops: an 8 x 16 tile of outputs per
parallel task, the reduction walked outside it) brings a [512, 1536] x [1536, 8960] fp16 MatMul to 23 GFLOP/s.
The summation order of every output element is unchanged (k ascending), so the schedule changes speed, never the
arithmetic (test: bitwise equal to the unscheduled build).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_model

Io = namedtuple("Io", "name")  # what qvlc reads of ONNX Runtime's NodeArg


class TvmBuildError(RuntimeError):
    """TVM could not import or build a graph: validation records it as a failed check of the TVM runtime."""


def host_target():
    """``llvm`` for this CPU: its name (so F16C/AVX are used) and its core count."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": os.cpu_count() or 1})


ROWS, COLS = 8, 16  # the output tile each parallel task accumulates while it walks the reduction


def _tile(sch, loop, size: int) -> int:
    from tvm import tirx

    extent = sch.get(loop).extent
    return min(size, int(extent)) if isinstance(extent, tirx.IntImm) else size


def _schedule_reductions():
    """A module pass: every reduction block with one reduction loop gets a ROWS x COLS tile of outputs per parallel
    task (the outer spatial loops fused and run in parallel), the reduction loop walked outside the tile. A function
    the rule does not fit is left as Relax built it (correct, slower)."""
    import tvm
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    @tvm.transform.module_pass(opt_level=0, name="QvlcScheduleReductions")
    def schedule(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            sch = s_tir.Schedule(func)
            try:
                infos = normalize_prim_func(sch) or []
                done = False
                for info in infos:
                    if not info.is_reduction():
                        continue
                    loops = sch.get_loops(info.block_rv)
                    spatial = [lp for lp, it in zip(loops, info.iters) if it.kind == "S"]
                    reduce = [lp for lp, it in zip(loops, info.iters) if it.kind == "R"]
                    if not spatial or len(reduce) != 1:
                        continue
                    outer_j, inner_j = sch.split(spatial[-1], factors=[None, _tile(sch, spatial[-1], COLS)])
                    if len(spatial) > 1:  # a register tile of ROWS x COLS outputs: each B row read once per tile
                        outer_i, inner_i = sch.split(spatial[-2], factors=[None, _tile(sch, spatial[-2], ROWS)])
                        sch.reorder(*spatial[:-2], outer_i, outer_j, reduce[0], inner_i, inner_j)
                        sch.parallel(sch.fuse(*spatial[:-2], outer_i, outer_j))
                    else:
                        sch.reorder(outer_j, reduce[0], inner_j)
                        sch.parallel(outer_j)
                    sch.decompose_reduction(info.block_rv, reduce[0])
                    done = True
            except (tvm.TVMError, ValueError, AttributeError):
                continue  # this function keeps its default loops
            if done:
                mod[gv] = sch.mod["main"].with_attr("global_symbol", gv.name_hint)
        return mod

    return schedule


@contextlib.contextmanager
def _quiet_native():
    """TVM's C++ side logs a warning per gather it lowers ("Fast mode segfaults when there are out-of-bounds
    indices": the ONNX frontend's choice; qvlc's feeds are in bounds) — hundreds of lines for a 2B graph. They go
    to a scratch file instead of the user's terminal, unless QVLC_VERBOSE is set; Python warnings too."""
    if os.environ.get("QVLC_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class TvmSession:
    """One ONNX graph compiled by TVM Relax for the host CPU, run with ONNX Runtime's ``run(names, feeds)``."""

    def __init__(self, model: str | bytes | Path, weights_dir: Path | None = None, schedule: bool = True) -> None:
        """``schedule=False`` builds the loop nests as Relax lowers them (the tests compare the two bitwise)."""
        # TVM sizes its thread pool by physical cores (1 on this 2-vCPU machine: measured 6.2 → 12.2 GFLOP/s with 2)
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        import tvm
        from tvm import relax
        from tvm.relax.frontend import detach_params
        from tvm.relax.frontend.onnx import from_onnx

        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
            if weights_dir is not None:
                load_external_data_for_model(proto, str(weights_dir))
        else:
            proto = onnx.load(str(model))
        self._inputs = [Io(i.name) for i in proto.graph.input]
        self._outputs = [Io(o.name) for o in proto.graph.output]
        try:
            with _quiet_native():
                mod = from_onnx(proto, keep_params_in_input=True)
                del proto
                mod, params = detach_params(mod)
                target = host_target()
                with target:
                    mod = tvm.ir.transform.Sequential([
                        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                        *([_schedule_reductions()] if schedule else [])])(mod)
                self._vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        except Exception as exc:  # noqa: BLE001 — any import/build failure of the second compiler is a finding
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise TvmBuildError(f"TVM could not import or build the graph: {first.strip()[:300]}") from exc
        self._params = list(params.get("main", []))

    def get_inputs(self) -> list[Io]:
        return self._inputs

    def get_outputs(self) -> list[Io]:
        return self._outputs

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i.name])) for i in self._inputs]
        out = self._vm["main"](*args, *self._params)
        values = [out] if hasattr(out, "numpy") else list(out)
        got = {o.name: v.numpy() for o, v in zip(self._outputs, values)}
        return [got[n] for n in (output_names or [o.name for o in self._outputs])]
