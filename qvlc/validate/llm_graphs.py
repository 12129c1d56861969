"""The graph phase of LLM validation: every prompt through the deployment host path into the prefill graph, then
the greedy decode of all prompts together (``run_graphs``), on ONNX Runtime, TVM, or the unsplit tp = 1 module in
eager torch (``TorchGraph``) behind the same interface."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qvlc.checkpoint.hf_model import LoadedCheckpoint
from qvlc.checkpoint.lazy import lazy_text_model
from qvlc.host.rope import decode_position
from qvlc.models.common.quantized import quantized_tree
from qvlc.models.common.tp import rank_layout
from qvlc.precision import Runtime
from qvlc.runtime.kvcache import kv_values
from qvlc.runtime.llm import LlmRuntime, Window
from qvlc.system.malloc import trim_heap
from qvlc.system.memory import release_memory
from qvlc.validate.llm_cases import LlmCase
from qvlc.validate.phases import Phases

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan


@dataclass
class GraphRun:
    """What the graphs computed for one prompt (per rank): the oracle is compared with this afterwards."""

    case: LlmCase
    window: Window
    tokens: list[int] = field(default_factory=list)  # generated greedily: g_0 from prefill, g_k from decode k-1
    logits: list[list[np.ndarray]] = field(default_factory=list)  # per step (prefill, decode 0 …), per rank
    # per step, per rank: [L,2,kvH,T,D] (real positions): the values attention reads (an int8 cache dequantized)
    kv: list[list[np.ndarray]] = field(default_factory=list)
    unsplit_logits: list[np.ndarray] = field(default_factory=list)  # tp > 1: the tp = 1 module on the same tokens


class TorchGraph:
    """A deployment module run in eager torch behind RankedGraph's interface (one rank)."""

    def __init__(self, module: torch.nn.Module, input_names, output_names) -> None:
        self.module, self.input_names, self.output_names = module, input_names, output_names

    @torch.no_grad()
    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[0][n])) for n in self.input_names))
        return [{n: o.numpy() for n, o in zip(self.output_names, outs)}]

    def run_many(self, items: list[list[dict[str, np.ndarray]]]) -> list[list[dict[str, np.ndarray]]]:
        return [self.run(feeds) for feeds in items]


def llm_runtime(plan: Plan, folder: Path, graphs: dict | None = None, runtime: Runtime = Runtime.ONNXRUNTIME,
                chunked: bool = False) -> LlmRuntime:
    """The host loop over the artifact's graphs (``graphs``: runners by file name instead), filling the cache with
    the full prefill graph, or with the chunk graph when ``chunked``."""
    spec, v = plan.llm_spec, plan.dims.vision
    if graphs is not None:
        spec = replace(spec, tp=1, kv_heads_per_rank=plan.dims.text.kv_heads)
    return LlmRuntime(folder, spec, plan.family, merge_size=v.merge_size, tokens_per_second=v.tokens_per_second,
                      graphs=graphs, runtime=runtime, chunked=chunked)


def unsplit_runtime(plan: Plan, ck: LoadedCheckpoint | None, folder: Path) -> LlmRuntime:
    """The tp = 1 deployment module (eager torch, the export dtype) behind the same host loop as the ranks, built
    from the loaded model or, without one, from the checkpoint files."""
    text_model, lm_head = (ck.text_model, ck.lm_head) if ck is not None else \
        quantized_tree(*lazy_text_model(plan.checkpoint), plan.quant)
    sigs = plan.family.llm_signatures(replace(plan.llm_spec, tp=1, kv_heads_per_rank=plan.dims.text.kv_heads))
    graphs, stack = {}, None
    e = plan.cfg.export
    for name, sig in sigs.items():
        module, stack = plan.family.llm_graph(name, text_model, lm_head, plan.dims, rank_layout(plan.dims.text, 1, 0),
                                              e.dtype.torch, stack, plan.islands, e.kv_cache)
        graphs[name] = TorchGraph(module, sig.input_names, sig.output_names)
    return llm_runtime(plan, folder, graphs)


def run_graphs(plan: Plan, folder: Path, cases: list[LlmCase], steps: int, unsplit: LlmRuntime | None,
               on: Runtime = Runtime.ONNXRUNTIME, fed: list[GraphRun] | None = None,
               phases: Phases | None = None, chunked: bool = False) -> list[GraphRun]:
    """Phase 1: every prefill, then (prefill sessions released) the greedy decode of every prompt together, on
    runtime ``on``. Decode runs step-major with the prompts inside each graph segment (``decode_many``), so every
    decode step reads the weights once for all prompts, not once per prompt. With ``fed`` (another runtime's runs)
    each decode step is fed the token that run chose, so the oracle's teacher-forced pass fits both; ``tokens``
    still records this runtime's own argmax at every step. ``chunked``: the cache filled by the chunk graph."""
    runtime, S, phases = llm_runtime(plan, folder, runtime=on, chunked=chunked), plan.cfg.export.prefill_len, \
        phases or Phases()
    runs, states, unsplit_states = [], [], []
    first = f"chunks of {plan.cfg.export.prefill_chunk}" if chunked else "prefill"
    with phases.phase(f"{first} ({on})", f"{len(cases)} prompts, one at a time"):
        _prefill_all(runtime, unsplit, cases, runs, states, unsplit_states)
    with phases.phase(f"decode{' after chunks' if chunked else ''} ({on})",
                      f"{steps} steps, the {len(cases)} prompts together in each graph segment"):
        _decode_all(runtime, unsplit, runs, states, unsplit_states, steps, S, fed)
    return runs


def _prefill_all(runtime: LlmRuntime, unsplit: LlmRuntime | None, cases: list[LlmCase], runs: list[GraphRun],
                 states: list, unsplit_states: list) -> None:
    for case in cases:
        w = runtime.prompt_window(case.ids, case.media)
        outs = runtime.prefill_window(w)
        real = np.flatnonzero(runtime.state.past_mask[0])  # the prompt's slots in the cache
        run = GraphRun(case, w, logits=[[o["logits"].reshape(-1) for o in outs]],
                       kv=[[kv_values(cache)[:, :, 0][..., real, :] for cache in runtime.state.kv]])
        del outs
        states.append(runtime.take_state())  # the sequence's KV, handed over (no copy)
        if unsplit is not None:
            run.unsplit_logits.append(unsplit.logits_of(unsplit.prefill_window(w)))
            unsplit_states.append(unsplit.take_state())
        runs.append(run)
        release_memory()  # the call's freed activations: page cache for the weights, not resident heap
    runtime.release_prefill()
    release_memory()


def _decode_all(runtime: LlmRuntime, unsplit: LlmRuntime | None, runs: list[GraphRun], states: list,
                unsplit_states: list, steps: int, S: int, fed: list[GraphRun] | None) -> None:
    for step in range(steps + 1):
        for run in runs:
            run.tokens.append(int(np.argmax(np.concatenate(run.logits[-1]))))
        if step == steps:
            break
        tokens = [fed[i].tokens[step] if fed is not None else run.tokens[-1] for i, run in enumerate(runs)]
        embeds = [runtime.embed.lookup(np.array([t]))[0] for t in tokens]
        positions = [decode_position(S, step, run.window.delta) for run in runs]  # the host's rule
        for run, outs in zip(runs, runtime.decode_many(states, embeds, positions)):
            run.logits.append([o["logits"].reshape(-1) for o in outs])
            run.kv.append([kv_values(o, "present")[:, :, 0] for o in outs])
        if unsplit is not None:
            for run, outs in zip(runs, unsplit.decode_many(unsplit_states, embeds, positions)):
                run.unsplit_logits.append(unsplit.logits_of(outs))
        trim_heap()
