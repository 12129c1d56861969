"""The LLM part's export stage: embed_tokens.bin, and per rank a prefill and a decode graph sharing one weights
file."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.artifacts import discard
from qvlc.export.onnx_export import ExportedGraph, ExportResult, check_graph, export_module, graph_io, simplify, \
    write_shared
from qvlc.host.embeddings import write_embed_table
from qvlc.models.qwen2_vl import llm as llm_mod
from qvlc.models.qwen2_vl.checkpoint import LoadedCheckpoint
from qvlc.runtime import DECODE, EMBED, PREFILL, WEIGHTS, LlmSpec, rank_dirs

if TYPE_CHECKING:
    from qvlc.pipeline import Plan


def llm_spec(plan: "Plan") -> LlmSpec:
    cfg, t = plan.cfg, plan.dims.text
    layout = llm_mod.rank_layout(t, cfg.export.tp, 0)
    return LlmSpec(cfg.export.prefill_len, cfg.export.max_context, cfg.export.tp, cfg.export.dtype, t.hidden,
                   t.layers, t.head_dim, layout.kv_heads, t.vocab, t.rope_theta, t.mrope_section,
                   plan.dims.tokens.eos, plan.dims.tokens.image)


def export_llm(plan: "Plan", ck: LoadedCheckpoint, stage: Path, simplify_graphs: bool) -> ExportResult:
    """embed_tokens.bin, then per rank the prefill and decode graphs sharing one weights file."""
    cfg, dims = plan.cfg, plan.dims
    e = cfg.export
    result = ExportResult()
    table = ck.text_model.embed_tokens.weight.detach().numpy()
    result.bytes_written += write_embed_table(table, stage / EMBED, e.dtype)
    dtype = llm_mod.DTYPES[e.dtype]
    split_points = []
    for rank, folder in enumerate(rank_dirs(stage, e.tp)):
        layout = llm_mod.rank_layout(dims.text, e.tp, rank)
        stack = llm_mod.TextStack(ck.text_model, ck.lm_head, dims.text, layout, dtype)
        prefill_args, decode_args = llm_mod.example_inputs(dims.text, layout, dtype, e.prefill_len, e.max_context)
        graphs = []
        for name, cls, args in ((PREFILL, llm_mod.PrefillGraph, prefill_args),
                                (DECODE, llm_mod.DecodeGraph, decode_args)):
            g = ExportedGraph(name, export_module(cls(stack), args, cls.input_names, cls.output_names, e.opset))
            if simplify_graphs:
                g = simplify(g, stage / "_work" / f"rank{rank}")
            graphs.append(g)
        stats = write_shared(graphs, folder, WEIGHTS)
        result.bytes_written += stats["weights_bytes"]
        result.weights_unshared_bytes += stats["unshared_bytes"]
        for g in graphs:
            check_graph(folder / g.name)
            result.bytes_written += (folder / g.name).stat().st_size
            result.graphs.append({"file": (folder / g.name).relative_to(stage).as_posix(), "rank": rank,
                                  **graph_io(folder / g.name)})
        if e.tp > 1:
            split_points.append({"rank": rank, "files": [f"rank{rank}/{n}" for n in (PREFILL, DECODE, WEIGHTS)],
                                 "kv_heads": [layout.kv_head_start, layout.kv_head_start + layout.kv_heads],
                                 "vocab": [layout.vocab_start, layout.vocab_start + layout.vocab],
                                 "split_points": layout.split_points(dims.text.layers)})
        del graphs, stack
        gc.collect()
    discard(stage / "_work")
    spec = llm_spec(plan)
    result.manifest = {
        "llm": {**spec.__dict__, "mrope_section": list(spec.mrope_section)},
        "tp": {"ranks": e.tp, "reduction": "qvlc.AllReduce (sum) after o_proj and after down_proj",
               "kv_replicated": dims.text.kv_heads < e.tp, "per_rank": split_points},
    }
    return result
