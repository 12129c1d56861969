"""Parity of the LLM graphs against the unmodified transformers model (fp32).

The ONNX side goes through the same host path a deployment uses: ``embed_tokens.bin`` (in the export dtype), image
and video rows scattered into their pad positions, the family's NumPy ``get_rope_index`` and M-RoPE cos/sin, left
padding to S, and the KV cache carried between ONNX Runtime calls. The oracle gets the same tokens and vision rows,
with positions from transformers' own ``get_rope_index``, so the host rope code is checked too.

Checks, in order: graph interfaces (names → shapes → dtypes against the family's signatures), prefill logits and
KV on several prompts, decode steps teacher-forced on the oracle's greedy token, and free-running greedy
generation against ``transformers.generate``. With tp > 1 every rank's slice is compared with the matching slice
of the oracle, and the recombined result with the oracle and with the unsplit (tp = 1) deployment module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qvlc.contract import LlmSpec, rank_dirs
from qvlc.host.rope import decode_position
from qvlc.models.common.checkpoint import LoadedCheckpoint
from qvlc.models.common.family import Family
from qvlc.models.common.tp import RankLayout, rank_layout
from qvlc.plan import Plan
from qvlc.runtime.llm import KvState, LlmRuntime, Window
from qvlc.validate.interface import check_interface
from qvlc.validate.llm_cases import (
    LlmCase,
    build_cases,
    build_generation_cases,
    with_image_rows,
)
from qvlc.validate.metrics import ParityReport, TokenCheck


def _grids(grids: np.ndarray | None) -> torch.Tensor | None:
    return None if grids is None or not len(grids) else torch.from_numpy(np.asarray(grids))


# ---------------------------------------------------------------------------------------------- oracle


class Oracle:
    """The unmodified transformers model in fp32, driven step by step with explicit positions."""

    def __init__(self, ck: LoadedCheckpoint, family: Family) -> None:
        self.ck, self.family = ck, family
        self.model = ck.model
        self.embed_tokens = ck.text_model.embed_tokens

    def embeds(self, ids: np.ndarray, case: LlmCase) -> torch.Tensor:
        tokens = self.ck.dims.tokens
        with torch.no_grad():
            e = self.embed_tokens(torch.from_numpy(ids)[None]).clone()
            for token, rows in ((tokens.image, case.media.image_embeds), (tokens.video, case.media.video_embeds)):
                if rows is not None:
                    e[0, torch.from_numpy(ids == token)] = torch.from_numpy(rows)
        return e

    @torch.no_grad()
    def prefill(self, ids: np.ndarray, mask: np.ndarray, case: LlmCase):
        ids_t, mask_t = torch.from_numpy(ids)[None], torch.from_numpy(mask)[None]
        m = case.media
        pos, delta = self.model.model.get_rope_index(
            input_ids=ids_t, image_grid_thw=_grids(m.images), video_grid_thw=_grids(m.videos),
            attention_mask=mask_t, **self.family.oracle_video_kwargs(m.second_per_grid_ts))
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
                                                    torch.from_numpy(case.media.image_grids))
        return torch.cat(list(feats)).numpy()

    @torch.no_grad()
    def generate(self, case: LlmCase, n: int) -> list[int]:
        ids = torch.from_numpy(case.ids)[None]
        kwargs = {}
        if case.pixel_values is not None:
            # transformers 4.57 generate(inputs_embeds=...) ignores image grids for M-RoPE (rope_deltas stays 0),
            # so image prompts are generated from pixels, the path users run.
            kwargs = {"pixel_values": torch.from_numpy(case.pixel_values),
                      "image_grid_thw": torch.from_numpy(case.media.image_grids)}
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

    def __init__(self, module: torch.nn.Module, input_names, output_names) -> None:
        self.module, self.input_names, self.output_names = module, input_names, output_names

    @torch.no_grad()
    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[0][n])) for n in self.input_names))
        return [{n: o.numpy() for n, o in zip(self.output_names, outs)}]


def llm_runtime(plan: Plan, folder: Path, graphs: tuple | None = None) -> LlmRuntime:
    spec, v = plan.llm_spec, plan.dims.vision
    if graphs is not None:
        spec = replace(spec, tp=1, kv_heads_per_rank=plan.dims.text.kv_heads)
    return LlmRuntime(folder, spec, plan.family, v.merge_size, v.tokens_per_second, graphs)


def unsplit_runtime(plan: Plan, ck: LoadedCheckpoint, folder: Path) -> LlmRuntime:
    """The tp = 1 deployment module (eager torch, the export dtype) behind the same host loop as the ranks."""
    sigs = plan.family.llm_signatures(replace(plan.llm_spec, tp=1, kv_heads_per_rank=plan.dims.text.kv_heads))
    graphs, stack = [], None
    for name, sig in sigs.items():
        module, stack = plan.family.llm_graph(name, ck.text_model, ck.lm_head, plan.dims,
                                              rank_layout(plan.dims.text, 1, 0), plan.cfg.export.dtype.torch, stack)
        graphs.append(TorchGraph(module, sig.input_names, sig.output_names))
    return llm_runtime(plan, folder, tuple(graphs))


@dataclass
class _Prefilled:
    """A prompt after phase 1: what the decode phase continues from, on both sides."""

    case: LlmCase
    state: KvState  # ONNX side (all ranks)
    unsplit_state: KvState | None  # the tp = 1 module, when tp > 1
    cache: object | None  # the oracle's transformers cache (teacher-forced cases)
    logits: np.ndarray  # what the next token is chosen from: the oracle's (teacher-forced) or ours (generation)
    window: Window  # the host's prompt window (ONNX side)
    ref_delta: int = 0  # transformers' rope_delta (oracle side)
    expected: list[int] | None = None  # transformers generate (generation cases)


def check_interfaces(plan: Plan, folder: Path, report: ParityReport) -> bool:
    sigs = plan.family.llm_signatures(plan.llm_spec)
    ok = True
    for r, d in enumerate(rank_dirs(folder, plan.cfg.export.tp)):
        for name, sig in sigs.items():
            graph = name.removesuffix(".onnx").removeprefix("llm_") + (f"[rank{r}]" if plan.cfg.export.tp > 1 else "")
            ok &= check_interface(report, graph, d / name, sig)
    return ok


def validate_llm(plan: Plan, ck: LoadedCheckpoint, folder: Path, report: ParityReport, seed: int = 0) -> None:
    """Phase 1 prefills every prompt and keeps each one's KV state; the prefill sessions are then released and
    phase 2 runs every decode step. Only one graph's sessions are alive at a time, which bounds peak memory
    (on CPU, ONNX Runtime holds fp32 casts of fp16 weights: ~7.6 GB per 2B session)."""
    if not check_interfaces(plan, folder, report):
        report.notes.append("value checks skipped: a graph interface does not match the contract")
        return
    dims, spec, v = plan.dims, plan.llm_spec, plan.cfg.validate
    runtime = llm_runtime(plan, folder)
    oracle = Oracle(ck, plan.family)
    # With tp > 1 the recombined ranks are also compared with the unsplit module: same dtype, same host path,
    # so any difference beyond summation order comes from the split itself.
    unsplit = unsplit_runtime(plan, ck, folder) if spec.tp > 1 else None
    layouts = [rank_layout(dims.text, spec.tp, r) for r in range(spec.tp)]
    embed_std = float(ck.text_model.embed_tokens.weight.std())
    S, L = spec.prefill_len, dims.text.layers

    prefilled: list[_Prefilled] = []
    for case in build_cases(dims, S, seed, embed_std):
        w = runtime.prompt_window(case.ids, case.media)
        ref_logits, cache, ref_delta = oracle.prefill(w.ids, w.mask, case)
        if w.delta != ref_delta:
            report.fail("host", case.name, "rope_delta", f"host rope_delta {w.delta} != transformers {ref_delta}")
        outs = runtime.prefill(w.embeds, w.positions, w.mask)
        real = np.flatnonzero(w.mask)
        got = _compare_step(report, "prefill", case.name, runtime, outs, ref_logits,
                            oracle_kv(cache, L)[..., real, :], real, layouts)
        unsplit_state = None
        if unsplit is not None:
            report.add("prefill vs tp=1", case.name, "logits", unsplit.logits_of(
                unsplit.prefill(w.embeds, w.positions, w.mask)), got)
            unsplit_state = unsplit.snapshot()
        prefilled.append(_Prefilled(case, runtime.snapshot(), unsplit_state, cache, ref_logits, w, ref_delta))
    for case in build_generation_cases(dims, S, seed):
        w = runtime.prompt_window(case.ids, with_image_rows(case, oracle.image_embeds(case)).media
                                  if case.pixel_values is not None else case.media)
        logits = runtime.logits_of(runtime.prefill(w.embeds, w.positions, w.mask))
        prefilled.append(_Prefilled(case, runtime.snapshot(), None, None, logits, w,
                                    expected=oracle.generate(case, v.generate_tokens)))
    runtime.release_prefill()
    for p in prefilled:
        _continue(p, runtime, unsplit, oracle, report, layouts, spec, v.decode_steps, v.generate_tokens, L)


def _continue(p: "_Prefilled", runtime: LlmRuntime, unsplit: LlmRuntime | None, oracle: Oracle,
              report: ParityReport, layouts: list[RankLayout], spec: LlmSpec, decode_steps: int,
              generate_tokens: int, layers: int) -> None:
    """Phase 2 for one prompt: free-running greedy generation, or teacher-forced decode steps."""
    S = spec.prefill_len
    runtime.restore(p.state)
    if p.expected is not None:
        got_tokens = runtime.greedy(p.logits, p.window.delta, generate_tokens)
        report.tokens.append(TokenCheck("prefill+decode", p.case.name, p.expected, got_tokens,
                                        required=spec.dtype == "fp32"))
        return
    if unsplit is not None:
        unsplit.restore(p.unsplit_state)
    token, ref_logits, cache, full_mask = int(np.argmax(p.logits)), p.logits, p.cache, p.window.mask.copy()
    for step in range(decode_steps):
        full_mask = np.concatenate([full_mask, [1]])
        ref_logits, cache = oracle.decode(token, full_mask, S + step + p.ref_delta, cache, S + step)
        embed = runtime.embed.lookup(np.array([token]))[0]
        position = decode_position(S, step, p.window.delta)  # the host's rule
        outs = runtime.decode(embed, position)
        new_kv = oracle_kv(cache, layers)[..., -1:, :]
        got = _compare_step(report, "decode", f"{p.case.name}/step{step}", runtime, outs, ref_logits, new_kv,
                            np.array([0]), layouts)
        if unsplit is not None:
            ref = unsplit.logits_of(unsplit.decode(embed, position))
            report.add("decode vs tp=1", f"{p.case.name}/step{step}", "logits", ref, got)
        token = int(np.argmax(ref_logits))
