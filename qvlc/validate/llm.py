"""Parity of the LLM graphs against the unmodified transformers model (fp32).

The ONNX side goes through the same host path a deployment uses: ``embed_tokens.bin`` (in the export dtype), image
rows scattered into the image-pad positions, NumPy ``get_rope_index`` and M-RoPE cos/sin, left padding to S, and
the KV cache carried between ONNX Runtime calls. The oracle gets the same tokens and image rows, with positions
from transformers' own ``get_rope_index``, so the host rope code is checked too.

Checks, in order: graph interfaces (names → shapes → dtypes), prefill logits and KV on several prompts, decode
steps teacher-forced on the oracle's greedy token, and free-running greedy generation against
``transformers.generate``. With tp > 1 every rank's slice is compared with the matching slice of the oracle,
and the recombined result with the oracle and with the unsplit (tp = 1) deployment module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qvlc.host.rope import decode_position
from qvlc.models.qwen2_vl.checkpoint import LoadedCheckpoint
from qvlc.models.qwen2_vl.dims import Qwen2VLDims
from qvlc.models.qwen2_vl.llm import DTYPES, DecodeGraph, PrefillGraph, RankLayout, TextStack, rank_layout
from qvlc.runtime import KvState, LlmRuntime, LlmSpec
from qvlc.validate.metrics import ParityReport, TokenCheck


@dataclass
class LlmCase:
    name: str
    ids: np.ndarray  # real tokens, unpadded, int64 [n]
    grids: np.ndarray | None  # image_grid_thw [k, 3] (patches, before merging)
    image_embeds: np.ndarray | None  # [image tokens, H] float32, scattered into the image-pad positions
    pixel_values: np.ndarray | None = None  # when set, the oracle computes the image rows itself (generation)


def _text(rng: np.random.Generator, n: int, dims: Qwen2VLDims) -> list[int]:
    first_special = min(dims.tokens.vision_start, dims.tokens.image, dims.tokens.bos or 1 << 62)
    return rng.integers(0, min(first_special, dims.text.vocab), size=n).tolist()


def _grid_for(tokens: int, aspect: float, merge: int) -> tuple[int, int, int]:
    """A single-frame grid with about ``tokens`` merged tokens at roughly ``aspect`` (width / height)."""
    a = max(1, int(round((tokens / aspect) ** 0.5)))
    b = max(1, tokens // a)
    return (1, a * merge, b * merge)


def _image_span(dims: Qwen2VLDims, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    n = t * h * w // dims.vision.merge_unit
    return [dims.tokens.vision_start] + [dims.tokens.image] * n + [dims.tokens.vision_end]


def _image_prompt(rng, dims: Qwen2VLDims, grids: list[tuple[int, int, int]], total: int) -> list[int]:
    """Text, images separated by text, text: exactly ``total`` tokens."""
    spans = [_image_span(dims, g) for g in grids]
    text = total - sum(map(len, spans))
    if text < len(grids) + 1:
        raise ValueError(f"{total} tokens cannot hold images {grids}")
    cuts = np.sort(rng.choice(np.arange(1, text), size=len(grids), replace=False))
    pieces = np.split(np.array(_text(rng, text, dims)), cuts)
    ids: list[int] = []
    for piece, span in zip(pieces, spans + [[]]):
        ids += piece.tolist() + span
    return ids


def build_cases(dims: Qwen2VLDims, prefill_len: int, seed: int, embed_std: float) -> list[LlmCase]:
    """Prompts of different lengths with image spans; all but the last are left-padded to S."""
    rng = np.random.default_rng(seed)
    S, m, H = prefill_len, dims.vision.merge_size, dims.text.hidden
    cases = [LlmCase("text_short", np.array(_text(rng, max(8, S // 4), dims)), None, None)]
    g1 = _grid_for(max(2, S // 8), 1.5, m)
    g2, g3 = _grid_for(max(2, S // 10), 0.5, m), _grid_for(max(3, S // 6), 2.0, m)
    for name, grids, total in (("one_image_half", [g1], S // 2), ("two_images_full", [g2, g3], S)):
        ids = np.array(_image_prompt(rng, dims, grids, total))
        n_img = int((ids == dims.tokens.image).sum())
        emb = (rng.standard_normal((n_img, H)) * embed_std).astype(np.float32)
        cases.append(LlmCase(name, ids, np.array(grids, dtype=np.int64), emb))
    return cases


def build_generation_cases(dims: Qwen2VLDims, prefill_len: int, seed: int) -> list[LlmCase]:
    """A text prompt and an image prompt whose image rows come from the transformers vision tower."""
    rng = np.random.default_rng(seed + 1)
    S, m = prefill_len, dims.vision.merge_size
    text = LlmCase("generate_text", np.array(_text(rng, max(8, S // 3), dims)), None, None)
    grid = _grid_for(max(2, S // 8), 1.0, m)
    ids = np.array(_image_prompt(rng, dims, [grid], S // 2))
    patches = grid[0] * grid[1] * grid[2]
    pixels = rng.uniform(-1.8, 2.1, size=(patches, dims.vision.patch_dim)).astype(np.float32)  # normalized range
    return [text, LlmCase("generate_image", ids, np.array([grid], dtype=np.int64), None, pixels)]


# ---------------------------------------------------------------------------------------------- oracle


class Oracle:
    """The unmodified transformers model in fp32, driven step by step with explicit positions."""

    def __init__(self, ck: LoadedCheckpoint) -> None:
        self.ck = ck
        self.model = ck.model
        self.embed_tokens = ck.text_model.embed_tokens

    def embeds(self, ids: np.ndarray, case: LlmCase) -> torch.Tensor:
        with torch.no_grad():
            e = self.embed_tokens(torch.from_numpy(ids)[None]).clone()
            if case.image_embeds is not None:
                e[0, torch.from_numpy(ids == self.ck.dims.tokens.image)] = torch.from_numpy(case.image_embeds)
        return e

    @torch.no_grad()
    def prefill(self, ids: np.ndarray, mask: np.ndarray, case: LlmCase):
        ids_t, mask_t = torch.from_numpy(ids)[None], torch.from_numpy(mask)[None]
        grids = None if case.grids is None else torch.from_numpy(case.grids)
        pos, delta = self.model.model.get_rope_index(ids_t, grids, None, mask_t)
        out = self.model(inputs_embeds=self.embeds(ids, case), attention_mask=mask_t, position_ids=pos,
                         use_cache=True, logits_to_keep=1)  # [S, vocab] fp32 logits would be 1.2 GB at 2B, S=2048
        return out.logits[0, -1].numpy(), out.past_key_values, int(delta.reshape(-1)[0])

    @torch.no_grad()
    def decode(self, token: int, mask: np.ndarray, position: int, cache, cache_position: int):
        emb = self.embed_tokens(torch.tensor([[token]]))
        pos = torch.full((3, 1, 1), position, dtype=torch.long)
        out = self.model(inputs_embeds=emb, attention_mask=torch.from_numpy(mask)[None], position_ids=pos,
                         past_key_values=cache, cache_position=torch.tensor([cache_position]), use_cache=True)
        return out.logits[0, -1].numpy(), out.past_key_values

    @torch.no_grad()
    def image_embeds(self, case: LlmCase) -> np.ndarray:
        feats = self.model.model.get_image_features(torch.from_numpy(case.pixel_values),
                                                    torch.from_numpy(case.grids))
        return torch.cat(list(feats)).numpy()

    @torch.no_grad()
    def generate(self, case: LlmCase, n: int) -> list[int]:
        ids = torch.from_numpy(case.ids)[None]
        kwargs = {}
        if case.pixel_values is not None:
            # transformers 4.57 generate(inputs_embeds=...) ignores image grids for M-RoPE (rope_deltas stays 0),
            # so image prompts are generated from pixels, the path users run.
            kwargs = {"pixel_values": torch.from_numpy(case.pixel_values),
                      "image_grid_thw": torch.from_numpy(case.grids)}
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
        return out[0, ids.shape[1]:].tolist()


def _cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def oracle_kv(cache, layers: int) -> np.ndarray:
    """transformers cache → [L, 2, kvH, T, D]."""
    return np.stack([np.stack([t[0].numpy() for t in _cache_kv(cache, i)]) for i in range(layers)])


# ---------------------------------------------------------------------------------------------- checks


def host_inputs(runtime: LlmRuntime, dims: Qwen2VLDims, case: LlmCase, image_embeds: np.ndarray | None):
    """What a deployment host computes for a prompt: (padded ids, mask, positions, rope delta, embeddings)."""
    return runtime.prompt_window(case.ids, dims.tokens, dims.vision.merge_size, case.grids, image_embeds)


def _kv_slices(layouts: list[RankLayout]) -> list[slice]:
    return [slice(lay.kv_head_start, lay.kv_head_start + lay.kv_heads) for lay in layouts]


def _compare_step(report: ParityReport, graph: str, case: str, runtime: LlmRuntime, outs, ref_logits: np.ndarray,
                  ref_kv: np.ndarray, positions: np.ndarray, layouts: list[RankLayout]) -> np.ndarray:
    """Logits and KV, per rank (tp > 1) and recombined. ``ref_kv``/rank KV: [L,2,kvH,T,D] over ``positions``."""
    logits = runtime.logits_of(outs)
    report.add(graph, case, "logits", ref_logits, logits)
    kv_ranks = [o["present_key_values"][:, :, 0][..., positions, :] for o in outs]
    if len(outs) > 1:
        for r, (lay, kv, sl) in enumerate(zip(layouts, kv_ranks, _kv_slices(layouts))):
            report.add(graph, case, f"rank{r}.logits",
                       ref_logits[lay.vocab_start:lay.vocab_start + lay.vocab], outs[r]["logits"].reshape(-1))
            report.add(graph, case, f"rank{r}.present_key_values", ref_kv[:, :, sl], kv)
    # Recombined KV: each kv head once, from the first rank that holds it.
    heads: dict[int, np.ndarray] = {}
    for lay, kv in zip(layouts, kv_ranks):
        for j in range(lay.kv_heads):
            heads.setdefault(lay.kv_head_start + j, kv[:, :, j])
    merged = np.stack([heads[j] for j in sorted(heads)], axis=2)
    report.add(graph, case, "present_key_values", ref_kv, merged)
    return logits


class TorchGraph:
    """A deployment module run in eager torch behind RankedGraph's interface (one rank)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @torch.no_grad()
    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        names = self.module.input_names
        outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[0][n])) for n in names))
        return [{n: o.numpy() for n, o in zip(self.module.output_names, outs)}]


def unsplit_runtime(ck: LoadedCheckpoint, folder: Path, spec: LlmSpec) -> LlmRuntime:
    """The tp = 1 deployment module (eager torch, the export dtype) behind the same host loop as the ranks."""
    text = ck.dims.text
    stack = TextStack(ck.text_model, ck.lm_head, text, rank_layout(text, 1, 0), DTYPES[spec.dtype])
    spec1 = replace(spec, tp=1, kv_heads_per_rank=text.kv_heads)
    return LlmRuntime(folder, spec1, graphs=(TorchGraph(PrefillGraph(stack)), TorchGraph(DecodeGraph(stack))))


@dataclass
class _Prefilled:
    """A prompt after phase 1: what the decode phase continues from, on both sides."""

    case: LlmCase
    state: KvState  # ONNX side (all ranks)
    unsplit_state: KvState | None  # the tp = 1 module, when tp > 1
    cache: object | None  # the oracle's transformers cache (teacher-forced cases)
    logits: np.ndarray  # what the next token is chosen from: the oracle's (teacher-forced) or ours (generation)
    mask: np.ndarray
    delta: int  # the host's rope_delta (ONNX side)
    ref_delta: int = 0  # transformers' rope_delta (oracle side)
    expected: list[int] | None = None  # transformers generate (generation cases)


def validate_llm(ck: LoadedCheckpoint, folder: Path, spec: LlmSpec, decode_steps: int, generate_tokens: int,
                 report: ParityReport, seed: int = 0) -> None:
    """Phase 1 prefills every prompt and keeps each one's KV state; the prefill sessions are then released and
    phase 2 runs every decode step. Only one graph's sessions are alive at a time, which bounds peak memory
    (on CPU, ONNX Runtime holds fp32 casts of fp16 weights: ~7.6 GB per 2B session)."""
    dims = ck.dims
    runtime = LlmRuntime(folder, spec)
    oracle = Oracle(ck)
    # With tp > 1 the recombined ranks are also compared with the unsplit module: same dtype, same host path,
    # so any difference beyond summation order comes from the split itself.
    unsplit = unsplit_runtime(ck, folder, spec) if spec.tp > 1 else None
    layouts = [rank_layout(dims.text, spec.tp, r) for r in range(spec.tp)]
    embed_std = float(ck.text_model.embed_tokens.weight.std())
    S, L = spec.prefill_len, dims.text.layers

    prefilled: list[_Prefilled] = []
    for case in build_cases(dims, S, seed, embed_std):
        ids, mask, positions, delta, embeds = host_inputs(runtime, dims, case, case.image_embeds)
        ref_logits, cache, ref_delta = oracle.prefill(ids, mask, case)
        if delta != ref_delta:
            report.fail("host", case.name, "rope_delta", f"host rope_delta {delta} != transformers {ref_delta}")
        outs = runtime.prefill(embeds, positions, mask)
        real = np.flatnonzero(mask)
        got = _compare_step(report, "prefill", case.name, runtime, outs, ref_logits,
                            oracle_kv(cache, L)[..., real, :], real, layouts)
        unsplit_state = None
        if unsplit is not None:
            report.add("prefill vs tp=1", case.name, "logits", unsplit.logits_of(
                unsplit.prefill(embeds, positions, mask)), got)
            unsplit_state = unsplit.snapshot()
        prefilled.append(_Prefilled(case, runtime.snapshot(), unsplit_state, cache, ref_logits, mask, delta,
                                    ref_delta))
    for case in build_generation_cases(dims, S, seed):
        img = oracle.image_embeds(case) if case.pixel_values is not None else None
        _, mask, positions, delta, embeds = host_inputs(runtime, dims, case, img)
        logits = runtime.logits_of(runtime.prefill(embeds, positions, mask))
        prefilled.append(_Prefilled(case, runtime.snapshot(), None, None, logits, mask, delta,
                                    expected=oracle.generate(case, generate_tokens)))
    runtime.release_prefill()

    for p in prefilled:
        runtime.restore(p.state)
        if p.expected is not None:
            got_tokens = runtime.greedy(p.logits, p.delta, generate_tokens)
            report.tokens.append(TokenCheck("prefill+decode", p.case.name, p.expected, got_tokens,
                                            required=spec.dtype == "fp32"))
            continue
        if unsplit is not None:
            unsplit.restore(p.unsplit_state)
        token, ref_logits, cache, full_mask = int(np.argmax(p.logits)), p.logits, p.cache, p.mask.copy()
        for step in range(decode_steps):
            full_mask = np.concatenate([full_mask, [1]])
            ref_logits, cache = oracle.decode(token, full_mask, S + step + p.ref_delta, cache, S + step)
            embed = runtime.embed.lookup(np.array([token]))[0]
            outs = runtime.decode(embed, decode_position(S, step, p.delta))  # the host's rule
            new_kv = oracle_kv(cache, L)[..., -1:, :]
            got = _compare_step(report, "decode", f"{p.case.name}/step{step}", runtime, outs, ref_logits, new_kv,
                                np.array([0]), layouts)
            if unsplit is not None:
                ref = unsplit.logits_of(unsplit.decode(embed, decode_position(S, step, p.delta)))
                report.add("decode vs tp=1", f"{p.case.name}/step{step}", "logits", ref, got)
            token = int(np.argmax(ref_logits))
