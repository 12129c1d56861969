"""ONNX Runtime pipeline: run the compiled graphs, used by `qvlc run` and by validation.

Tensor-parallel ranks run here as well. ONNX Runtime has no ``qvlc.AllReduce`` kernel, so each rank graph is cut
at its reduction points into segments (in memory; the weights stay in the rank's file): all ranks run segment k,
the partial results are summed — exactly what the node promises a runtime will do — and the sum feeds segment
k + 1 on every rank. The final segment of each rank yields its vocab slice of the logits and its own KV heads.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from PIL import Image

from qvlc.artifacts import MANIFEST, read_manifest
from qvlc.errors import QvlcError
from qvlc.export.allreduce import DOMAIN, OP_TYPE, register_onnx_schema
from qvlc.host.embeddings import NP_DTYPES, EmbedTable
from qvlc.host.preprocess import ImageLike, PreprocessConfig, image_to_patches
from qvlc.host.rope import decode_cos_sin, get_rope_index, mrope_cos_sin

PREFILL = "llm_prefill.onnx"
DECODE = "llm_decode.onnx"
WEIGHTS = "llm_weights.data"
EMBED = "embed_tokens.bin"


def session_options(weights_dir: Path | None = None) -> ort.SessionOptions:
    """ONNX Runtime CPU options for every qvlc graph, chosen by measurement (2B, fp16, 2 cores). The CPU provider
    runs fp16 MatMuls in fp32 and keeps fp32 casts of the weights; on top of that:

    - weight prepacking off: it keeps yet another packed copy (visual session 6.5 → 3.0 GB; LLM prefill
      7.6 → 7.2 GB);
    - memory pattern off: with it the arena grows with the prompt length, and a second visual call allocated a
      fresh block for the whole plan (visual peak ~13 → 8.9 GB; calls also ran faster, 45 s vs 57 s).
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_mem_pattern = False
    if weights_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return so


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


@dataclass
class KvState:
    """The host side of a sequence: per-rank KV caches, the past mask and the next free slot."""

    kv: list[np.ndarray]
    past_mask: np.ndarray
    slot: int


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
        self._graphs: dict[str, object] = {} if graphs is None else {PREFILL: graphs[0], DECODE: graphs[1]}
        self.embed = EmbedTable(self.folder / EMBED, s.vocab, s.hidden, s.dtype)
        self.np_dtype = NP_DTYPES[s.dtype]
        self.kv: list[np.ndarray] = []
        self.past_mask = np.zeros((1, s.max_context - 1), dtype=np.int64)
        self.slot = 0

    # -- graphs: opened on first use; the prefill graph can be released once every prompt is prefilled --------
    def _graph(self, name: str):
        if name not in self._graphs:
            self._graphs[name] = RankedGraph([d / name for d in rank_dirs(self.folder, self.spec.tp)])
        return self._graphs[name]

    @property
    def prefill_graph(self):
        return self._graph(PREFILL)

    @property
    def decode_graph(self):
        return self._graph(DECODE)

    def release_prefill(self) -> None:
        """Free the prefill sessions (on CPU an fp16 2B session holds ~7.6 GB: ORT keeps fp32 casts of the weights)."""
        self._graphs.pop(PREFILL, None)
        gc.collect()

    # -- KV state -----------------------------------------------------------------------------------------
    def snapshot(self) -> KvState:
        return KvState([kv.copy() for kv in self.kv], self.past_mask.copy(), self.slot)

    def restore(self, state: KvState) -> None:
        self.kv = [kv.copy() for kv in state.kv]
        self.past_mask = state.past_mask.copy()
        self.slot = state.slot

    # -- the host's prompt window -------------------------------------------------------------------------
    def prompt_window(self, ids: np.ndarray, tokens, merge_size: int, image_grid_thw: np.ndarray | None = None,
                      image_embeds: np.ndarray | None = None):
        """What a deployment host computes for a prompt of real tokens ``ids``: left-padded to S, its mask,
        M-RoPE positions and rope delta (``tokens``: the model's TokenIds), and the embedding rows from
        embed_tokens.bin with ``image_embeds`` scattered into the image-pad positions.
        Returns (padded ids [S], mask [S], positions [3,S], rope_delta, embeds [S,H])."""
        S, n = self.spec.prefill_len, len(ids)
        if n > S:
            raise QvlcError(f"the prompt has {n} tokens but the LLM graphs hold {S}",
                            fix=f"shorten the prompt (or use smaller images), or recompile with export.prefill_len "
                                f">= {-(-n // 16) * 16}", key="export.prefill_len")
        padded = np.concatenate([np.zeros(S - n, dtype=np.int64), np.asarray(ids, dtype=np.int64)])
        mask = np.concatenate([np.zeros(S - n, dtype=np.int64), np.ones(n, dtype=np.int64)])
        grids = image_grid_thw if image_grid_thw is not None and len(image_grid_thw) else None
        positions, delta = get_rope_index(padded, tokens, merge_size, image_grid_thw=grids, attention_mask=mask)
        return padded, mask, positions, delta, self.embed.embed(padded, self.spec.image_token, image_embeds)

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
    def greedy(self, logits: np.ndarray, rope_delta: int, max_new_tokens: int,
               stop_ids: Collection[int] | None = None,
               on_token: Callable[[int, bool], None] | None = None) -> list[int]:
        """Greedy decoding from the current KV state, whose last step produced ``logits``.

        Stops after ``max_new_tokens`` or at a token in ``stop_ids`` (kept, as transformers does; ``None`` means
        never stop early). ``on_token(id, last)`` streams each token. The token written into slot ``slot`` sits
        at M-RoPE position ``slot + rope_delta`` (transformers' cache_position + rope delta).
        """
        stops = frozenset(stop_ids or ())
        tokens: list[int] = []
        for step in range(max_new_tokens):
            tok = int(np.argmax(logits))
            tokens.append(tok)
            last = tok in stops or step == max_new_tokens - 1
            if on_token is not None:
                on_token(tok, last)
            if last:
                break
            logits = self.logits_of(self.decode(self.embed.lookup(np.array([tok]))[0], self.slot + rope_delta))
        return tokens


# ---------------------------------------------------------------------------------------------------------------
# Image(s) + prompt → text: the LLM and visual artifacts together (`qvlc run`).
# ---------------------------------------------------------------------------------------------------------------


TINY_CHECKPOINT = "tiny"
# Stop tokens of a Qwen2-VL chat turn besides the config's eos (Instruct's generation_config lists both).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

TokenCallback = Callable[[int, str], None]


def token_agreement(expected: Sequence[int], got: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences: how many greedy tokens agree before the first split."""
    n = 0
    for a, b in zip(expected, got):
        if a != b:
            break
        n += 1
    return n


def load_image(path: Path | str) -> Image.Image:
    """Open an image file fully as RGB; QvlcError (key ``image``) when it is missing or not a readable image."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QvlcError(f"{str(p)!r} " + ("is a folder, not an image file" if p.is_dir() else "does not exist"),
                        fix="pass the path of an image file (PNG, JPEG, …)", key="image")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise QvlcError(f"{str(p)!r} is not a readable image ({type(exc).__name__}: {exc})",
                        fix="pass a valid image file in a format Pillow reads (PNG, JPEG, WebP, BMP, …)",
                        key="image") from exc


def _read_part_manifest(folder: Path, part: str, option: str) -> dict:
    """The manifest of an artifact folder that must be of ``part`` ("llm" or "visual")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QvlcError(f"artifact folder {str(folder)!r} does not exist",
                        fix=f"give {option} the folder of a finished `qvlc compile` (part: {part})", key=option)
    if not (folder / MANIFEST).is_file():
        raise QvlcError(f"{folder} has no {MANIFEST}, so it is not a finished artifact",
                        fix=f"give {option} the folder of a finished `qvlc compile` (part: {part})", key=option)
    m = read_manifest(folder)
    if m.get("part") != part or part not in m:
        raise QvlcError(f"{folder} is a {m.get('part')!r} artifact, not a {part!r} one",
                        fix=f"give {option} the folder compiled with `part: {part}` (LLM folder first, then visual)",
                        key=option)
    return m


def resolve_checkpoint(manifest: dict, override: Path | str | None = None) -> Path:
    """The checkpoint folder holding the tokenizer, chat template and config.json of an artifact.

    ``override`` wins; else the manifest's ``config.model.checkpoint`` ("tiny" → the embedded default with the
    manifest's seed). QvlcError when the folder is gone (e.g. an artifact compiled on another machine).
    """
    if override is not None:
        name, where = str(override), "--checkpoint"
    else:
        name = manifest.get("config", {}).get("model", {}).get("checkpoint") or TINY_CHECKPOINT
        where = "model.checkpoint"
    if name == TINY_CHECKPOINT:
        from qvlc.models.qwen2_vl.tiny import TINY_SEED, tiny_checkpoint

        return tiny_checkpoint(seed=manifest.get("source", {}).get("tiny_seed", TINY_SEED))
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise QvlcError(f"checkpoint folder {str(folder)!r} does not exist",
                        fix="pass --checkpoint FOLDER: a folder with the checkpoint's config.json, tokenizer files "
                            "and chat template", key=where)
    return folder


@dataclass(frozen=True)
class VlmPrompt:
    """A chat prompt ready for the graphs: token ids with the image pads expanded, and the images' patches."""

    text: str  # the chat-templated text, one <|image_pad|> per image (before expansion)
    input_ids: np.ndarray  # int64 [n], unpadded
    pixel_values: np.ndarray  # float32 [patches, patch_dim], all images in prompt order
    image_grid_thw: np.ndarray  # int64 [k, 3]
    image_tokens: int  # image-pad tokens in input_ids: sum(t*h*w) / merge²


@dataclass
class VlmResult:
    """What one generation produced, with its timings (seconds, from the call to ``generate``)."""

    tokens: list[int]  # generated ids, the stop token included when it was generated
    text: str  # detokenized, special tokens skipped
    prompt_tokens: int
    image_tokens: int
    stopped_at_eos: bool
    time_to_first_token: float  # preprocessing + visual graph + prefill
    seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first one per second of decoding (0 when only one token was generated)."""
        t = self.seconds - self.time_to_first_token
        return (len(self.tokens) - 1) / t if len(self.tokens) > 1 and t > 0 else 0.0


class _StreamDecoder:
    """Incremental detokenization: the new text of each token, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # window start: enough context for byte-level merges
        self.read = 0  # tokens whose text was already emitted
        self.emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)
            self.emitted += piece
            return piece
        return ""

    def finish(self) -> tuple[str, str]:
        """(the full text, what of it was not emitted yet)."""
        text = self._decode(self.tokens)
        rest = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        return text, rest


class VlmPipeline:
    """Images + prompt → text through ONNX Runtime: chat template, host preprocessing, visual graph, embedding
    lookup and scatter, M-RoPE, left-padded prefill, greedy decode with the KV cache, streaming detokenization.

    The tokenizer and chat template come from the checkpoint named in the LLM manifest (or ``checkpoint``).
    Raises QvlcError when the folders are not an LLM and a visual artifact of the same checkpoint.
    """

    def __init__(self, llm_dir: Path | str, visual_dir: Path | str, checkpoint: Path | str | None = None) -> None:
        from qvlc.models.qwen2_vl.dims import Qwen2VLDims
        from qvlc.models.qwen2_vl.tokenizer import load_processor
        from qvlc.runtime_visual import PREPROCESS, VisualRuntime, VisualSpec

        self.llm_dir, self.visual_dir = Path(llm_dir), Path(visual_dir)
        llm_m = _read_part_manifest(self.llm_dir, "llm", "LLM_DIR")
        vis_m = _read_part_manifest(self.visual_dir, "visual", "VISUAL_DIR")
        self.spec = LlmSpec.from_manifest(llm_m)
        self.visual_spec = VisualSpec.from_manifest(vis_m)
        pre = self.visual_dir / PREPROCESS
        if not pre.is_file():
            raise QvlcError(f"{self.visual_dir} has no {PREPROCESS}", fix="recompile the visual part with this qvlc",
                            key="VISUAL_DIR")
        self.preprocess = PreprocessConfig.from_json(pre.read_text())
        self._check_pair(llm_m, vis_m)
        self.checkpoint = resolve_checkpoint(llm_m, checkpoint)
        self.dims = Qwen2VLDims.from_checkpoint(self.checkpoint)
        self._check_checkpoint()
        self.processor = load_processor(self.checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.image_pad = self.tokenizer.convert_ids_to_tokens(self.spec.image_token)
        if not self.image_pad or self.tokenizer.convert_tokens_to_ids(self.image_pad) != self.spec.image_token:
            raise QvlcError(f"the tokenizer of {self.checkpoint} has no token for image id {self.spec.image_token}",
                            fix="pass --checkpoint the folder the artifacts were compiled from", key="--checkpoint")
        self.stop_ids = {self.spec.eos} if self.spec.eos is not None else set()
        for name in STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                self.stop_ids.add(tid)
        self.llm = LlmRuntime(self.llm_dir, self.spec)
        self.visual = VisualRuntime(self.visual_dir, self.visual_spec)

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_pair(self, llm_m: dict, vis_m: dict) -> None:
        """Same source weights (sha256), matching widths and patch layout; dtypes may differ (the image rows
        are cast to the LLM's dtype, as the embedding table's rows are)."""
        a, b = llm_m.get("source", {}).get("weights"), vis_m.get("source", {}).get("weights")
        if a != b:
            raise QvlcError(
                f"{self.llm_dir} and {self.visual_dir} were compiled from different checkpoints "
                f"({llm_m['source'].get('checkpoint')!r} vs {vis_m['source'].get('checkpoint')!r}: weight hashes "
                "differ)", fix="compile both parts from the same model.checkpoint", key="VISUAL_DIR")
        if self.visual_spec.out_hidden != self.spec.hidden:
            raise QvlcError(f"the visual artifact outputs {self.visual_spec.out_hidden}-wide image rows, the LLM "
                            f"embeds {self.spec.hidden}-wide tokens",
                            fix="compile both parts from the same model.checkpoint", key="VISUAL_DIR")
        pre, v = self.preprocess, self.visual_spec
        if (pre.merge_size, pre.patch_dim) != (v.merge_size, v.patch_dim):
            raise QvlcError(f"preprocess.json (merge {pre.merge_size}, patch_dim {pre.patch_dim}) disagrees with the "
                            f"visual graph (merge {v.merge_size}, patch_dim {v.patch_dim})",
                            fix="recompile the visual part", key="VISUAL_DIR")

    def _check_checkpoint(self) -> None:
        d = self.dims
        if (d.text.hidden, d.text.vocab, d.tokens.image) != (self.spec.hidden, self.spec.vocab,
                                                             self.spec.image_token):
            raise QvlcError(
                f"checkpoint {self.checkpoint} (hidden {d.text.hidden}, vocab {d.text.vocab}, image token "
                f"{d.tokens.image}) does not match the LLM artifact (hidden {self.spec.hidden}, vocab "
                f"{self.spec.vocab}, image token {self.spec.image_token})",
                fix="pass --checkpoint the folder the artifacts were compiled from", key="--checkpoint")

    # -- prompt -----------------------------------------------------------------------------------------------
    def messages(self, n_images: int, prompt: str) -> list[dict]:
        """One user turn: the images first, then the prompt (Qwen2-VL's usual order)."""
        return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                             {"type": "text", "text": prompt}]}]

    def prepare(self, images: Sequence[ImageLike | Path | str], prompt: str) -> VlmPrompt:
        """Chat template → host preprocessing of each image (preprocess.json) → ids with each ``<|image_pad|>``
        expanded to its image's t*h*w / merge² tokens (what Qwen2VLProcessor does with the same grids)."""
        pil = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        text = self.processor.apply_chat_template(self.messages(len(pil), prompt), tokenize=False,
                                                  add_generation_prompt=True)
        parts = [image_to_patches(im, self.preprocess) for im in pil]
        pixels = (np.concatenate([p for p, _ in parts]) if parts
                  else np.zeros((0, self.preprocess.patch_dim), dtype=np.float32))
        grids = np.stack([g for _, g in parts]) if parts else np.zeros((0, 3), dtype=np.int64)
        pieces = text.split(self.image_pad)
        if len(pieces) - 1 != len(parts):
            raise QvlcError(f"the templated prompt holds {len(pieces) - 1} {self.image_pad} for {len(parts)} "
                            "images", fix=f"do not write {self.image_pad} in the prompt text, and use the "
                            "checkpoint's own chat_template", key="prompt")
        unit = self.visual_spec.merge_unit
        expanded = pieces[0] + "".join(self.image_pad * int(g.prod() // unit) + p for g, p in zip(grids, pieces[1:]))
        ids = np.asarray(self.tokenizer(expanded)["input_ids"], dtype=np.int64)  # as Qwen2VLProcessor calls it
        return VlmPrompt(text, ids, pixels, grids, int(grids.prod(axis=1).sum()) // unit)

    # -- graphs -----------------------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: np.ndarray, grids: np.ndarray) -> np.ndarray | None:
        """Image rows [tokens, H] in prompt order; images are packed into as few visual calls as fit N patches."""
        if len(grids) == 0:
            return None
        sizes = grids.prod(axis=1)
        out, start, group = [], 0, []
        for i, n in enumerate(sizes):
            if group and sizes[group].sum() + n > self.visual_spec.max_patches:
                end = start + int(sizes[group].sum())
                out.append(self.visual.run(pixel_values[start:end], grids[group]))
                start, group = end, []
            group.append(i)
        out.append(self.visual.run(pixel_values[start:], grids[group]))
        return np.concatenate(out)

    def check_fits(self, prompt: VlmPrompt) -> None:
        """QvlcError (key ``export.prefill_len``) when the prompt is longer than the prefill window S."""
        S, n = self.spec.prefill_len, len(prompt.input_ids)
        if n > S:
            raise QvlcError(f"the prompt is {n} tokens ({prompt.image_tokens} of them image tokens), the LLM "
                            f"artifact's prefill window holds {S}",
                            fix=f"shorten the prompt or use smaller images, or recompile the LLM part with "
                                f"export.prefill_len >= {-(-n // 16) * 16}", key="export.prefill_len")

    def host_inputs(self, prompt: VlmPrompt,
                    image_embeds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(embeds [S,H], positions [3,S], mask [S], rope_delta) for the prompt left-padded to S."""
        self.check_fits(prompt)
        _, mask, positions, delta, embeds = self.llm.prompt_window(
            prompt.input_ids, self.dims.tokens, self.visual_spec.merge_size, prompt.image_grid_thw, image_embeds)
        return embeds, positions, mask, delta

    # -- generation -------------------------------------------------------------------------------------------
    def generate(self, images: Sequence[ImageLike | Path | str], prompt: str, max_new_tokens: int = 32,
                 stop_at_eos: bool = True, on_token: TokenCallback | None = None) -> VlmResult:
        """Greedy generation; ``on_token(id, text)`` receives each token and its new text (may be "", e.g. for a
        special token or an incomplete UTF-8 sequence; the held-back text comes with a later token)."""
        s = self.spec
        room = s.max_context - s.prefill_len
        if not 1 <= max_new_tokens <= room:
            raise QvlcError(f"max_new_tokens is {max_new_tokens}; the LLM artifact's KV cache leaves room for "
                            f"{room} new tokens (max_context {s.max_context} - prefill_len {s.prefill_len})",
                            fix=f"use 1 <= max_new_tokens <= {room}, or recompile with a larger export.max_context",
                            key="export.max_context" if max_new_tokens > room else "max_new_tokens")
        t0 = time.perf_counter()
        prepared = self.prepare(images, prompt)
        self.check_fits(prepared)  # before the visual graph runs
        rows = self.image_embeds(prepared.pixel_values, prepared.image_grid_thw)
        embeds, positions, mask, delta = self.host_inputs(prepared, rows)
        stream = _StreamDecoder(self.tokenizer)
        text, ttft = "", 0.0

        def emit(tok: int, last: bool) -> None:
            nonlocal text, ttft
            if not ttft:
                ttft = time.perf_counter() - t0
            piece = stream.push(tok)
            if last:  # flush what the stream decoder held back, with the last token
                text, rest = stream.finish()
                piece += rest
            if on_token is not None:
                on_token(tok, piece)

        logits = self.llm.logits_of(self.llm.prefill(embeds, positions, mask))
        tokens = self.llm.greedy(logits, delta, max_new_tokens, self.stop_ids if stop_at_eos else None, emit)
        stopped = stop_at_eos and tokens[-1] in self.stop_ids
        return VlmResult(tokens, text, len(prepared.input_ids), prepared.image_tokens, stopped, ttft,
                         time.perf_counter() - t0)
