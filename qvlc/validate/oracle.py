"""The LLM oracle: transformers' own text modules in fp32, run teacher-forced on whole token sequences.

Two implementations of one interface, ``run(sequences) -> [OracleOutput]``:

- ``StreamedOracle`` (the default): transformers' own decoder-layer, norm and rotary classes (unmodified), with
  each layer's weights read from the checkpoint files when that layer runs and released after, layer-major over
  every sequence — so each layer is read once and the oracle's memory is one layer (plus the hidden states and
  the KV it records). The embedding rows and lm_head are read in blocks.
- ``InMemoryOracle``: the whole transformers model, loaded (small models; a test shows both agree).

A sequence is a prompt at its real length (no padding) followed by the tokens the graphs generated; the oracle
returns the logits at the positions that predict each generated token and the KV of every position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from qvlc.checkpoint.hf_model import Shell, causal
from qvlc.checkpoint.lazy import lazy_text_model, materialize, read_float
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family
from qvlc.models.common.kvquant import fake_quantize_kv
from qvlc.models.common.quantized import quantized_tree
from qvlc.precision import KvCache
from qvlc.validate.ranges import LINEAR, LINEAR_IN, RangeRecorder, remove
from qvlc.weights.quant import WeightQuant

LAYERS = "model.language_model.layers"  # transformers' module names, as the range report gives them

LOGIT_BLOCK = 16384  # vocabulary rows of lm_head read at a time (7B: 235 MB in fp32)


@dataclass
class OracleInput:
    ids: np.ndarray  # int64 [T]: prompt (real tokens) + the continuation tokens
    rows: dict[int, np.ndarray]  # pad token → its vision rows [k, H] float32, scattered in order
    image_grids: np.ndarray | None
    video_grids: np.ndarray | None
    second_per_grid_ts: tuple[float, ...] | None
    prompt_len: int  # n: positions n-1 … T-1 predict the generated tokens
    name: str = ""  # the validation case (named in the fp16 range report)
    deepstack: dict[int, np.ndarray | None] = field(default_factory=dict)  # pad token → [k, rows, H] (Qwen3-VL)

    def deepstack_after(self, layer: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positions mask [T], rows [n, H]) to add to the hidden states after decoder layer ``layer``, as
        transformers' ``_deepstack_process`` adds them (each pad token's rows at its positions, in order)."""
        return [(self.at(token), rows[layer]) for token, rows in self.deepstack.items()
                if rows is not None and layer < len(rows)]

    def at(self, token: int) -> np.ndarray:
        """The prompt's positions of a pad token (a generated token that happens to equal it is text)."""
        return (self.ids == token) & (np.arange(len(self.ids)) < self.prompt_len)


@dataclass
class OracleOutput:
    logits: np.ndarray  # [T - n + 1, V] fp32: at positions n-1 … T-1
    kv: np.ndarray  # [L, 2, kvH, T, D] fp32
    delta: int  # transformers' rope_delta for the prompt


class _Recorder:
    """A transformers Cache stand-in: keeps the keys and values a layer computes (after rotary); with ``int8`` it
    applies the int8 cache rule first and returns what the cache would hold, as ``Int8Cache`` does."""

    def __init__(self, int8: bool = False) -> None:
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int8 = int8

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.int8:
            key_states, value_states = fake_quantize_kv(key_states), fake_quantize_kv(value_states)
        self.kv = (key_states, value_states)
        return key_states, value_states


class Int8Cache(DynamicCache):
    """transformers' own DynamicCache with the int8 cache rule (``qvlc.models.common.kvquant``) applied in its
    update: the new keys and values are quantized and stored dequantized, and attention reads what update
    returns — so the positions written in the same call are read quantized too, as the graphs read them."""

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return super().update(fake_quantize_kv(key_states), fake_quantize_kv(value_states), layer_idx, cache_kwargs)


@torch.no_grad()
def positions(model: torch.nn.Module, family: Family, seq: OracleInput) -> tuple[torch.Tensor, int]:
    """transformers' own M-RoPE positions of the prompt (``model.model.get_rope_index``: it reads only the config,
    so a meta-device model serves), then the continuation at n + k + delta."""
    n = seq.prompt_len
    ids = torch.from_numpy(seq.ids[:n])[None]
    grids = {k: None if g is None or not len(g) else torch.from_numpy(np.asarray(g))
             for k, g in (("image_grid_thw", seq.image_grids), ("video_grid_thw", seq.video_grids))}
    pos, delta = model.model.get_rope_index(input_ids=ids, attention_mask=torch.ones_like(ids), **grids,
                                            **family.oracle_video_kwargs(seq.second_per_grid_ts))
    delta = int(delta.reshape(-1)[0])
    tail = torch.arange(n, len(seq.ids)) + delta
    return torch.cat([pos, tail.view(1, 1, -1).expand(3, 1, -1)], dim=2), delta


class _Oracle:
    """``run(sequences, ranges)``: the oracle's pass, with the fp16 range recorder on when one is given."""

    @torch.no_grad()
    def run(self, seqs: list[OracleInput], ranges: RangeRecorder | None = None) -> list[OracleOutput]:
        """``ranges``: record every layer's magnitudes on the way (qvlc.validate.ranges)."""
        ranges = ranges or RangeRecorder(enabled=False)
        with ranges.recording():
            return self._run(seqs, ranges)

    def _run(self, seqs: list[OracleInput], ranges: RangeRecorder) -> list[OracleOutput]:
        raise NotImplementedError


class StreamedOracle(_Oracle):
    """One decoder layer in memory at a time (see the module docstring)."""

    def __init__(self, family: Family, folder: Path, dims: ModelDims, quant: WeightQuant | None = None,
                 kv_cache: KvCache = KvCache.FP) -> None:
        """``quant``: read the included Linear weights dequantized from their integers (export.weights) — the
        transformers model carrying exactly the weights the quantized graphs carry. ``kv_cache``: int8 applies the
        cache rule where each layer's keys and values enter the cache."""
        self.shell, self.dims = Shell(family, folder), dims
        self.int8 = KvCache(kv_cache) is KvCache.INT8
        self.text, self.head = quantized_tree(*lazy_text_model(folder), quant)

    def _embed(self, seqs: list[OracleInput]) -> list[torch.Tensor]:
        table = read_float(self.text, "embed_tokens.weight")
        out = []
        for seq in seqs:
            h = table[torch.from_numpy(seq.ids)].clone()
            for token, rows in seq.rows.items():
                if rows is not None:
                    h[torch.from_numpy(seq.at(token))] = torch.from_numpy(rows)
            out.append(h[None])
        del table
        return out

    def _run(self, seqs: list[OracleInput], ranges: RangeRecorder) -> list[OracleOutput]:
        pos = [positions(self.shell.model, self.shell.family, s) for s in seqs]
        hidden = self._embed(seqs)
        rope = [self.shell.rotary(h, p) for h, (p, _) in zip(hidden, pos)]
        kv: list[list[np.ndarray]] = [[] for _ in seqs]
        for i in range(self.dims.text.layers):
            # glibc's default allocation here, not heap_reuse: the prompts' differently sized [heads, T, T] scores
            # fragment a reused heap (7B int8: 13 GB anonymous in the oracle, OOM-killed at 16 GiB)
            layer = materialize(self.shell.layer_cls, self.shell.text_config, i, tree=self.text.layers[i])
            for j, h in enumerate(hidden):
                hidden[j], layer_kv = self._layer(layer, i, h, pos[j][0], rope[j], seqs[j], ranges, self.int8)
                kv[j].append(layer_kv)
            del layer
        norm = materialize(self.shell.norm_cls, self.dims.text.hidden, self.dims.text.rms_eps, tree=self.text.norm)
        last = [norm(h[0, s.prompt_len - 1:]) for h, s in zip(hidden, seqs)]
        for x, s in zip(last, seqs):
            ranges.observe("lm_head", LINEAR_IN, x, [(s.name, 0, 1)], whole=True)
        logits = [np.zeros((len(x), self.dims.text.vocab), np.float32) for x in last]
        w = self.head.weight
        for a in range(0, w.shape[0], LOGIT_BLOCK):
            block = w.narrow(0, a, min(LOGIT_BLOCK, w.shape[0] - a)).float()
            for out, x in zip(logits, last):
                out[:, a:a + len(block)] = (x @ block.T).numpy()
        for lg, s in zip(logits, seqs):
            ranges.observe("lm_head", LINEAR, torch.from_numpy(lg), [(s.name, 0, 1)], whole=True)
        return [OracleOutput(lg, np.stack(k), d) for lg, k, (_, d) in zip(logits, kv, pos)]

    @staticmethod
    def _layer(layer, i: int, h: torch.Tensor, position_ids, rope, seq: OracleInput,
               ranges: RangeRecorder, int8: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """Decoder layer ``i`` on one sequence: its output hidden states (DeepStack rows added) and its KV."""
        rec, t = _Recorder(int8), h.shape[1]
        handles = ranges.hook(layer, f"{LAYERS}.{i}", [(seq.name, 0, 1)], packed=False)
        out = layer(h, attention_mask=causal(t), position_ids=position_ids, past_key_values=rec,
                    use_cache=True, cache_position=torch.arange(t), position_embeddings=rope)
        h = out[0] if isinstance(out, tuple) else out  # Qwen3-VL's layers return the tensor
        for where, rows in seq.deepstack_after(i):  # DeepStack: after layer i, at the vision rows
            h[0, torch.from_numpy(where)] += torch.from_numpy(rows)
        remove(handles)
        return h, np.stack([x[0].numpy() for x in rec.kv])


def _deepstack_kwargs(seq: OracleInput) -> dict:
    """What Qwen3-VL's language model takes to add DeepStack rows (``visual_pos_masks`` and the rows of every
    vision position in order); nothing for a sequence without them."""
    layers = [r for r in seq.deepstack.values() if r is not None]
    if not layers:
        return {}
    mask = np.zeros(len(seq.ids), dtype=bool)
    for token, rows in seq.deepstack.items():
        if rows is not None:
            mask |= seq.at(token)
    dense = np.zeros((len(layers[0]), len(seq.ids), layers[0].shape[-1]), np.float32)
    for token, rows in seq.deepstack.items():
        if rows is not None:
            dense[:, seq.at(token)] = rows
    return {"visual_pos_masks": torch.from_numpy(mask)[None],
            "deepstack_visual_embeds": [torch.from_numpy(d[mask]) for d in dense]}


class InMemoryOracle(_Oracle):
    """The whole transformers model (already loaded), on each sequence in turn: for small models, and as the
    reference the streamed oracle is tested against."""

    def __init__(self, family: Family, model: torch.nn.Module, dims: ModelDims,
                 kv_cache: KvCache = KvCache.FP) -> None:
        self.family, self.model, self.dims = family, model, dims
        self.int8 = KvCache(kv_cache) is KvCache.INT8

    def _run(self, seqs: list[OracleInput], ranges: RangeRecorder) -> list[OracleOutput]:
        embed = self.model.model.language_model.embed_tokens
        out = []
        for seq in seqs:
            pos, delta = positions(self.model, self.family, seq)
            h = embed(torch.from_numpy(seq.ids)[None]).clone()
            for token, rows in seq.rows.items():
                if rows is not None:
                    h[0, torch.from_numpy(seq.at(token))] = torch.from_numpy(rows)
            handles = [hd for i, layer in enumerate(self.model.model.language_model.layers)
                       for hd in ranges.hook(layer, f"{LAYERS}.{i}", [(seq.name, 0, 1)], packed=False)]
            n = seq.prompt_len
            handles.append(self.model.lm_head.register_forward_hook(lambda m, i, o, name=seq.name, n=n: ranges.observe(
                "lm_head", LINEAR_IN, i[0][0, n - 1:], [(name, 0, 1)], whole=True)))
            kwargs = {**_deepstack_kwargs(seq), **({"past_key_values": Int8Cache()} if self.int8 else {})}
            if "deepstack_visual_embeds" in kwargs:
                # transformers' top model takes DeepStack rows only with pixels: its language model, then lm_head
                res = self.model.model.language_model(inputs_embeds=h, position_ids=pos, use_cache=True, **kwargs)
                logits = self.model.lm_head(res.last_hidden_state)
            else:  # 4.57: no logits_to_keep
                res = self.model(inputs_embeds=h, position_ids=pos, use_cache=True, **kwargs)
                logits = res.logits
            remove(handles)
            ranges.observe("lm_head", LINEAR, logits[0, n - 1:], [(seq.name, 0, 1)], whole=True)
            cache = res.past_key_values
            kv = np.stack([np.stack([cache.layers[i].keys[0].numpy(), cache.layers[i].values[0].numpy()])
                           for i in range(self.dims.text.layers)])
            out.append(OracleOutput(logits[0, n - 1:].numpy(), kv, delta))
        return out
