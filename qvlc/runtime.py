"""ONNX Runtime pipeline: run the compiled graphs, used by `qvlc run` and by validation.

Tensor-parallel ranks run here as well. ONNX Runtime has no ``qvlc.AllReduce`` kernel, so each rank graph is cut
at its reduction points into segments (in memory; the weights stay in the rank's file): all ranks run segment k,
the partial results are summed — exactly what the node promises a runtime will do — and the sum feeds segment
k + 1 on every rank. The final segment of each rank yields its vocab slice of the logits and its own KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort

from qvlc.artifacts import read_manifest
from qvlc.export.allreduce import DOMAIN, OP_TYPE, register_onnx_schema
from qvlc.host.embeddings import NP_DTYPES, EmbedTable
from qvlc.host.rope import decode_cos_sin, mrope_cos_sin

PREFILL = "llm_prefill.onnx"
DECODE = "llm_decode.onnx"
WEIGHTS = "llm_weights.data"
EMBED = "embed_tokens.bin"


def session_options(weights_dir: Path | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if weights_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return so


def open_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


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

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.segments: list[list[ort.InferenceSession]] = []  # [rank][segment]
        reduce_names = []
        for p in paths:
            segments, names = split_at_allreduce(p)
            self.segments.append([ort.InferenceSession(seg.SerializeToString(), session_options(p.parent),
                                                       providers=["CPUExecutionProvider"]) for seg in segments])
            reduce_names.append(names)
        if any(n != reduce_names[0] for n in reduce_names):
            raise ValueError(f"rank graphs {[str(p) for p in paths]} have different reduction points")
        self.reduce_names: list[str] = reduce_names[0]  # AllReduce outputs, in graph order

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """``feeds[r]``: rank r's inputs. Returns each rank's outputs by name."""
        sums: dict[str, np.ndarray] = {}
        n_seg = len(self.segments[0])
        results: list[dict[str, np.ndarray]] = [dict() for _ in self.segments]
        for k in range(n_seg):
            partial = []
            for r, sessions in enumerate(self.segments):
                sess = sessions[k]
                avail = {**feeds[r], **sums}
                out = sess.run(None, {i.name: avail[i.name] for i in sess.get_inputs()})
                if k < n_seg - 1:
                    partial.append(out[0])
                else:
                    results[r] = {o.name: v for o, v in zip(sess.get_outputs(), out)}
            if k < n_seg - 1:
                # The AllReduce: every rank receives the sum of all ranks' partial results.
                reduced = partial[0].astype(np.float32)
                for p in partial[1:]:
                    reduced = reduced + p.astype(np.float32)
                sums[self.reduce_names[k]] = reduced.astype(partial[0].dtype)
        return results


@dataclass(frozen=True)
class LlmSpec:
    """What the runtime needs to know about an LLM artifact, read from its manifest."""

    prefill_len: int
    max_context: int
    tp: int
    dtype: str
    hidden: int
    layers: int
    head_dim: int
    kv_heads_per_rank: int
    vocab: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    eos: int | None
    image_token: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "LlmSpec":
        s = manifest["llm"]
        return cls(s["prefill_len"], s["max_context"], s["tp"], s["dtype"], s["hidden"], s["layers"], s["head_dim"],
                   s["kv_heads_per_rank"], s["vocab"], s["rope_theta"], tuple(s["mrope_section"]), s["eos"],
                   s["image_token"])


def rank_dirs(folder: Path, tp: int) -> list[Path]:
    return [folder] if tp == 1 else [folder / f"rank{r}" for r in range(tp)]


class LlmRuntime:
    """Prefill + decode loop with a host-managed KV cache, over one or several ranks."""

    def __init__(self, folder: Path, spec: LlmSpec | None = None, graphs: tuple | None = None) -> None:
        """``graphs`` replaces the ONNX graphs by other runners with the same ``run(feeds per rank)``
        (validation drives the unsplit torch deployment module this way)."""
        self.folder = Path(folder)
        self.spec = spec or LlmSpec.from_manifest(read_manifest(self.folder))
        s = self.spec
        if graphs is None:
            dirs = rank_dirs(self.folder, s.tp)
            graphs = (RankedGraph([d / PREFILL for d in dirs]), RankedGraph([d / DECODE for d in dirs]))
        self.prefill_graph, self.decode_graph = graphs
        self.embed = EmbedTable(self.folder / EMBED, s.vocab, s.hidden, s.dtype)
        self.np_dtype = NP_DTYPES[s.dtype]
        self.kv: list[np.ndarray] = []
        self.past_mask = np.zeros((1, s.max_context - 1), dtype=np.int64)
        self.slot = 0

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Run prefill on a full, already left-padded window: embeds [S,H], positions [3,S], mask [S] (0 = pad).
        Resets the KV cache to what prefill produced. Returns each rank's raw outputs."""
        s = self.spec
        S = s.prefill_len
        if embeds.shape != (S, s.hidden) or positions.shape != (3, S) or mask.shape != (S,):
            raise ValueError(f"prefill expects embeds [{S},{s.hidden}], positions [3,{S}], mask [{S}]; got "
                             f"{embeds.shape}, {positions.shape}, {mask.shape}")
        cos, sin = mrope_cos_sin(positions, s.head_dim, s.rope_theta, s.mrope_section, dtype=self.np_dtype)
        feed = {"inputs_embeds": embeds[None].astype(self.np_dtype), "attention_mask": mask[None].astype(np.int64),
                "cos": cos, "sin": sin}
        outs = self.prefill_graph.run([feed] * s.tp)
        C = s.max_context
        self.kv = []
        for o in outs:
            present = o["present_key_values"]
            buf = np.zeros(present.shape[:4] + (C - 1, s.head_dim), dtype=self.np_dtype)
            buf[..., :S, :] = present
            self.kv.append(buf)
        self.past_mask[:] = 0
        self.past_mask[0, :S] = mask
        self.slot = S
        return outs

    def logits_of(self, outs: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The full-vocabulary logits [V]: each rank's vocab slice, concatenated in rank order."""
        return np.concatenate([o["logits"].reshape(-1) for o in outs])

    # -- decode -------------------------------------------------------------------------------------------
    def decode(self, embed: np.ndarray, position: int) -> list[dict[str, np.ndarray]]:
        """One decode step for a token with embedding ``embed`` [H] at M-RoPE ``position``."""
        s = self.spec
        if self.slot >= s.max_context - 1:
            raise RuntimeError(f"KV cache full: max_context {s.max_context} reached")
        cos, sin = decode_cos_sin(position, s.head_dim, s.rope_theta, s.mrope_section, dtype=self.np_dtype)
        mask = np.concatenate([self.past_mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        x = embed.reshape(1, 1, s.hidden).astype(self.np_dtype)
        feeds = [{"inputs_embeds": x, "attention_mask": mask, "cos": cos, "sin": sin, "past_key_values": kv}
                 for kv in self.kv]
        outs = self.decode_graph.run(feeds)
        for kv, o in zip(self.kv, outs):
            kv[..., self.slot, :] = o["present_key_values"][..., 0, :]
        self.past_mask[0, self.slot] = 1
        self.slot += 1
        return outs

    # -- greedy generation --------------------------------------------------------------------------------
    def generate(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray, rope_delta: int,
                 max_new_tokens: int, stop_at_eos: bool = True, on_token=None) -> list[int]:
        """Greedy decoding from a left-padded prefill window; ``on_token(id)`` streams each new token."""
        s = self.spec
        outs = self.prefill(embeds, positions, mask)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            tok = int(np.argmax(self.logits_of(outs)))
            tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            if (stop_at_eos and s.eos is not None and tok == s.eos) or step == max_new_tokens - 1:
                break
            outs = self.decode(self.embed.lookup(np.array([tok]))[0], s.prefill_len + step + rope_delta)
        return tokens
