"""The LLM prefill/decode loop over ONNX Runtime, with a host-managed KV cache, over one or several ranks: what
`qvlc run` and validation drive."""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvlc.artifact.layout import CHUNK, DECODE, EMBED, PREFILL, rank_dirs
from qvlc.artifact.spec import LlmSpec, TokenIds
from qvlc.errors import QvlcError
from qvlc.host.embeddings import EmbedTable, dense_deepstack
from qvlc.host.rope import decode_cos_sin, decode_position, mrope_cos_sin
from qvlc.models.common.family import Family
from qvlc.precision import Runtime
from qvlc.runtime.artifact import open_artifact
from qvlc.runtime.kvcache import KvState, copy_state, empty_cache, write
from qvlc.runtime.ranked import RankedGraph


@dataclass(frozen=True)
class Media:
    """The images and videos of one prompt (each kind in prompt order): their grids and embedding rows."""

    image_grids: np.ndarray | None = None  # [k, 3] (t, h, w) in patches before merging
    image_embeds: np.ndarray | None = None  # [image tokens, H]
    video_grids: np.ndarray | None = None
    video_embeds: np.ndarray | None = None
    second_per_grid_ts: tuple[float, ...] | None = None  # seconds per temporal patch of each video
    image_deepstack: np.ndarray | None = None  # [k, image tokens, H]: DeepStack rows (Qwen3-VL)
    video_deepstack: np.ndarray | None = None

    @staticmethod
    def _some(grids: np.ndarray | None) -> np.ndarray | None:
        return grids if grids is not None and len(grids) else None

    @property
    def images(self) -> np.ndarray | None:
        return self._some(self.image_grids)

    @property
    def videos(self) -> np.ndarray | None:
        return self._some(self.video_grids)


@dataclass(frozen=True)
class Window:
    """A prompt as the prefill graph takes it: left-padded to S."""

    ids: np.ndarray  # [S] int64
    mask: np.ndarray  # [S] int64, 0 = left pad
    positions: np.ndarray  # [3, S] M-RoPE positions
    delta: int  # rope delta: decode step k sits at position S + k + delta
    embeds: np.ndarray  # [S, H], vision rows scattered in
    deepstack: np.ndarray | None = None  # [k, 1, S, H]: DeepStack rows at the vision positions, zeros elsewhere


def tokens_of(spec: LlmSpec) -> TokenIds:
    return TokenIds(bos=None, eos=spec.eos, vision_start=spec.vision_start, vision_end=spec.vision_end,
                    image=spec.image_token, video=spec.video_token)


class LlmRuntime:
    """Prefill + decode loop with a host-managed KV cache, over one or several ranks."""

    def __init__(self, folder: Path, spec: LlmSpec | None = None, family: Family | None = None, *,
                 merge_size: int = 2, tokens_per_second: int = 0, graphs: dict[str, object] | None = None,
                 runtime: Runtime = Runtime.ONNXRUNTIME, chunked: bool | None = None) -> None:
        """``spec``/``family`` default to the artifact's, opened and checked (``qvlc.runtime.artifact``);
        ``merge_size`` and ``tokens_per_second`` are the vision tower's (they shape M-RoPE positions of images
        and videos). ``graphs`` (by file name) replaces the ONNX graphs by other runners with the same
        ``run(feeds per rank)`` and ``run_many`` (validation drives the unsplit torch deployment module this way);
        ``runtime`` runs the graphs on ONNX Runtime (the default) or TVM. ``chunked``: fill the cache with the chunk
        graph (None: when the artifact has one; False: always the full prefill graph)."""
        self.folder, self.runtime = Path(folder), runtime
        if spec is None or family is None:
            m, family = open_artifact(self.folder, "llm", str(folder))
            spec = spec or m.llm
        self.spec, self.family = spec, family
        self.merge_size, self.tokens_per_second = merge_size, tokens_per_second
        s = self.spec
        self._graphs: dict[str, object] = dict(graphs or {})
        self.chunked = bool(s.prefill_chunk) if chunked is None else chunked
        if self.chunked and not s.prefill_chunk:
            raise ValueError("chunked prefill asked of an artifact without a chunk graph")
        self.embed = EmbedTable(self.folder / EMBED, s.vocab, s.hidden, s.dtype)
        self.np_dtype = s.dtype.numpy
        self.state = self._empty_state()

    # -- graphs: opened on first use; the prefill graph can be released once every prompt is prefilled --------
    def _graph(self, name: str):
        if name not in self._graphs:
            self._graphs[name] = RankedGraph([d / name for d in rank_dirs(self.folder, self.spec.tp)], self.runtime)
        return self._graphs[name]

    @property
    def prefill_graph(self):
        return self._graph(PREFILL)

    @property
    def decode_graph(self):
        return self._graph(DECODE)

    @property
    def chunk_graph(self):
        return self._graph(CHUNK)

    def release_prefill(self) -> None:
        """Free the prefill (and chunk) sessions (on CPU an fp16 2B session holds ~7.6 GB: ORT keeps fp32 casts of
        the weights)."""
        self._graphs.pop(PREFILL, None)
        self._graphs.pop(CHUNK, None)
        gc.collect()

    # -- KV state -----------------------------------------------------------------------------------------
    def _empty_state(self) -> KvState:
        return KvState([], np.zeros((1, self.spec.max_context - 1), dtype=np.int64), 0)

    def snapshot(self) -> KvState:
        return copy_state(self.state)

    def take_state(self) -> KvState:
        """The current sequence's state, handed over without a copy (the runtime starts empty again)."""
        state, self.state = self.state, self._empty_state()
        return state

    def restore(self, state: KvState) -> None:
        self.state = copy_state(state)

    # -- the host's prompt window -------------------------------------------------------------------------
    def prompt_window(self, ids: np.ndarray, media: Media = Media()) -> Window:
        """What a deployment host computes for a prompt of real tokens ``ids``: left-padded to S, its mask,
        the family's M-RoPE positions and rope delta, and the embedding rows from embed_tokens.bin with the image
        and video rows scattered into their pad positions."""
        S, n = self.spec.prefill_len, len(ids)
        if n > S:
            raise QvlcError(f"the prompt has {n} tokens but the LLM graphs hold {S}",
                            fix=f"shorten the prompt (or use smaller images), or recompile with export.prefill_len "
                                f">= {-(-n // 16) * 16}", key="export.prefill_len")
        padded = np.concatenate([np.zeros(S - n, dtype=np.int64), np.asarray(ids, dtype=np.int64)])
        mask = np.concatenate([np.zeros(S - n, dtype=np.int64), np.ones(n, dtype=np.int64)])
        positions, delta = self.family.rope_index(
            padded, tokens_of(self.spec), self.merge_size, self.tokens_per_second, image_grid_thw=media.images,
            video_grid_thw=media.videos, second_per_grid_ts=media.second_per_grid_ts, attention_mask=mask)
        rows = {self.spec.image_token: media.image_embeds, self.spec.video_token: media.video_embeds}
        deep = None
        if self.spec.deepstack_layers:
            deep = dense_deepstack(padded, {self.spec.image_token: media.image_deepstack,
                                            self.spec.video_token: media.video_deepstack},
                                   self.spec.deepstack_layers, self.spec.hidden, self.np_dtype)
        return Window(padded, mask, positions, delta, self.embed.embed(padded, rows), deep)

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill_feed(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                     deepstack: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The prefill graph's inputs for a full, left-padded window: embeds [S,H], positions [3,S], mask [S]
        (and the DeepStack rows [k,1,S,H] when the graph takes them; None: no vision rows, zeros)."""
        s = self.spec
        S = s.prefill_len
        if embeds.shape != (S, s.hidden) or positions.shape != (3, S) or mask.shape != (S,):
            raise ValueError(f"prefill expects embeds [{S},{s.hidden}], positions [3,{S}], mask [{S}]; got "
                             f"{embeds.shape}, {positions.shape}, {mask.shape}")
        cos, sin = mrope_cos_sin(positions, s.head_dim, s.rope_theta, s.mrope_section, dtype=self.np_dtype,
                                 interleaved=s.mrope_interleaved)
        feed = {"inputs_embeds": embeds[None].astype(self.np_dtype), "attention_mask": mask[None].astype(np.int64),
                "cos": cos, "sin": sin}
        if s.deepstack_layers:
            feed["deepstack_embeds"] = (np.zeros((s.deepstack_layers, 1, S, s.hidden), self.np_dtype)
                                        if deepstack is None else deepstack.astype(self.np_dtype))
        return feed

    def prefill_window(self, w: Window) -> list[dict[str, np.ndarray]]:
        return self.prefill(w.embeds, w.positions, w.mask, w.deepstack)

    def prefill(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                deepstack: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """Fill the KV cache from a full, already left-padded window: embeds [S,H], positions [3,S], mask [S]
        (0 = pad) — through the chunk graph when this runtime uses it, else the prefill graph. Resets the KV cache
        to the prompt's. Returns each rank's raw outputs of the last call (its logits are the last token's)."""
        if self.chunked:
            return self.run_chunks(self.chunk_feeds(embeds, positions, mask, deepstack))
        s = self.spec
        S = s.prefill_len
        outs = self.prefill_graph.run([self.prefill_feed(embeds, positions, mask, deepstack)] * s.tp)
        state = self._empty_state()
        for o in outs:
            state.kv.append(empty_cache(s))
            write(state.kv[-1], o, 0)
        state.past_mask[0, :S] = mask
        state.slot = state.window = S
        self.state = state
        return outs

    def chunk_feeds(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                    deepstack: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """The chunk graph's inputs, but the past cache and its mask, for a full left-padded window: its last
        W = ceil(n / T) * T rows (n real tokens), T at a time. The first chunk holds the left padding, so the last
        chunk's last row is the prompt's last token. The positions are the full window's: M-RoPE positions do not
        depend on the left padding and the rope delta is taken against S, so decode positions are the same as after
        the full prefill. ``attention_mask`` here is the new tokens' [1, T]."""
        s = self.spec
        S, T, dt = s.prefill_len, s.prefill_chunk, self.np_dtype
        self.prefill_feed(embeds, positions, mask, deepstack)  # the shape checks
        W = -(-max(1, int(np.count_nonzero(mask))) // T) * T  # whole chunks; an empty prompt still makes one call
        cos, sin = mrope_cos_sin(positions[:, S - W:], s.head_dim, s.rope_theta, s.mrope_section, dtype=dt,
                                 interleaved=s.mrope_interleaved)
        feeds = []
        for start in range(S - W, S, T):
            rows, at = slice(start, start + T), slice(start - S + W, start - S + W + T)
            feed = {"inputs_embeds": embeds[None, rows].astype(dt),
                    "attention_mask": mask[None, rows].astype(np.int64), "cos": cos[..., at, :], "sin": sin[..., at, :]}
            if s.deepstack_layers:
                feed["deepstack_embeds"] = (np.zeros((s.deepstack_layers, 1, T, s.hidden), dt) if deepstack is None
                                            else deepstack[:, :, rows].astype(dt))
            feeds.append(feed)
        return feeds

    def with_past(self, feed: dict[str, np.ndarray], state: KvState) -> list[dict[str, np.ndarray]]:
        """Each rank's full chunk-graph inputs: ``feed`` (from ``chunk_feeds``) against ``state``'s cache."""
        full = {**feed, "attention_mask": np.concatenate([state.past_mask, feed["attention_mask"]], axis=1)}
        return [{**full, **cache} for cache in state.kv]

    def run_chunks(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """``feeds`` (``chunk_feeds``) through the chunk graph into a new cache; returns the last call's outputs."""
        state = self._empty_state()
        state.kv = [empty_cache(self.spec) for _ in range(self.spec.tp)]
        outs: list[dict[str, np.ndarray]] = []
        for feed in feeds:
            outs = self.chunk_graph.run(self.with_past(feed, state))
            t = feed["inputs_embeds"].shape[1]
            for cache, o in zip(state.kv, outs):
                write(cache, o, state.slot)
            state.past_mask[0, state.slot:state.slot + t] = feed["attention_mask"][0]
            state.slot += t
        state.window = state.slot
        self.state = state
        return outs

    def logits_of(self, outs: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The full-vocabulary logits [V]: each rank's vocab slice, concatenated in rank order."""
        return np.concatenate([o["logits"].reshape(-1) for o in outs])

    # -- decode ------------------------------------------------------------------------------------------
    def decode(self, embed: np.ndarray, position: int) -> list[dict[str, np.ndarray]]:
        """One decode step for a token with embedding ``embed`` [H] at M-RoPE ``position``."""
        return self.decode_many([self.state], [embed], [position])[0]

    def decode_many(self, states: list[KvState], embeds: list[np.ndarray],
                    positions: list[int]) -> list[list[dict[str, np.ndarray]]]:
        """One decode step for each of several independent sequences (``states[i]``, advanced in place), run
        segment-major over the ranks (``RankedGraph.run_many``): the weights are read once for all of them.
        Each sequence's outputs are exactly what ``decode`` gives it alone."""
        s = self.spec
        items = []
        for state, embed, position in zip(states, embeds, positions):
            if state.slot >= s.max_context - 1:
                raise QvlcError(f"the KV cache is full: max_context {s.max_context} holds "
                                f"{s.max_context - state.window} generated tokens after the prompt's "
                                f"{state.window} slots",
                                fix="generate fewer tokens, or recompile with a larger export.max_context",
                                key="export.max_context")
            cos, sin = decode_cos_sin(position, s.head_dim, s.rope_theta, s.mrope_section, dtype=self.np_dtype,
                                      interleaved=s.mrope_interleaved)
            mask = np.concatenate([state.past_mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            x = embed.reshape(1, 1, s.hidden).astype(self.np_dtype)
            items.append([{"inputs_embeds": x, "attention_mask": mask, "cos": cos, "sin": sin, **cache}
                          for cache in state.kv])
        results = self.decode_graph.run_many(items)
        for state, outs in zip(states, results):
            for cache, o in zip(state.kv, outs):
                write(cache, o, state.slot)
            state.past_mask[0, state.slot] = 1
            state.slot += 1
        return results

    # -- greedy generation --------------------------------------------------------------------------------
    def greedy(self, logits: np.ndarray, rope_delta: int, max_new_tokens: int,
               stop_ids: Collection[int] | None = None,
               on_token: Callable[[int, bool], bool | None] | None = None) -> list[int]:
        """Greedy decoding from the current KV state, whose last step produced ``logits``.

        Stops after ``max_new_tokens`` or at a token in ``stop_ids`` (kept, as transformers does; ``None`` means
        never stop early). ``on_token(id, last)`` streams each token; when it returns True, generation stops after
        that token. The token fed at decode step k sits at M-RoPE position ``S + k + rope_delta``
        (``qvlc.host.rope.decode_position``: transformers' cache_position + rope delta).
        """
        stops = frozenset(stop_ids or ())
        first = self.state.slot - self.state.window  # decode steps already taken from this state
        tokens: list[int] = []
        for step in range(max_new_tokens):
            tok = int(np.argmax(logits))
            tokens.append(tok)
            last = tok in stops or step == max_new_tokens - 1
            if on_token is not None and on_token(tok, last):
                break
            if last:
                break
            position = decode_position(self.spec.prefill_len, first + step, rope_delta)
            logits = self.logits_of(self.decode(self.embed.lookup(np.array([tok]))[0], position))
        return tokens
