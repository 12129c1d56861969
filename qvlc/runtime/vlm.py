"""Images, videos and a prompt → text: the LLM and visual artifacts together (`qvlc run`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qvlc.artifact.manifest import Manifest
from qvlc.artifact.trust import Trust
from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.errors import QvlcError
from qvlc.host.preprocess import (
    ImageLike,
    PreprocessConfig,
    image_to_patches,
    video_to_patches,
)
from qvlc.host.vision import fit_grids
from qvlc.runtime.artifact import open_artifact, read_preprocess
from qvlc.runtime.llm import LlmRuntime, Media
from qvlc.runtime.media import Video, load_image
from qvlc.runtime.prompt import (
    VlmPrompt,
    VlmResult,
    resolve_checkpoint,
    split_deepstack,
)
from qvlc.runtime.stream import StreamDecoder
from qvlc.runtime.template import render_chat
from qvlc.runtime.visual import VisualRuntime

TokenCallback = Callable[[int, str], None]


class VlmPipeline:
    """Images/videos + prompt → text through ONNX Runtime: chat template, host preprocessing, visual graph,
    embedding lookup and scatter, the family's M-RoPE, left-padded prefill, greedy decode with the KV cache,
    streaming detokenization.

    The tokenizer and chat template come from the checkpoint named in the LLM manifest (or ``checkpoint``).
    Raises QvlcError when the folders are not an LLM and a visual artifact of the same checkpoint.
    """

    def __init__(self, llm_dir: Path | str, visual_dir: Path | str, *, checkpoint: Path | str | None = None,
                 trust: Trust = Trust()) -> None:
        """Both artifacts are checked before use, as far as ``trust`` says (``qvlc.artifact.trust``): manifest
        digest (and the pinned ones), every file's size, sha256, a parity that passed, and graphs whose interfaces
        are the ones their family declares."""
        from qvlc.checkpoint.tokenizer import load_processor

        self.llm_dir, self.visual_dir = Path(llm_dir), Path(visual_dir)
        llm_m, self.family = open_artifact(self.llm_dir, "llm", "LLM_DIR", trust)
        vis_m, _ = open_artifact(self.visual_dir, "visual", "VISUAL_DIR", trust)
        self.spec, self.visual_spec = llm_m.llm, vis_m.visual
        self.preprocess = read_preprocess(self.visual_dir)
        self._check_pair(llm_m, vis_m)
        self.checkpoint = resolve_checkpoint(llm_m, checkpoint)
        _, self.dims = inspect_checkpoint(self.checkpoint)
        self._check_checkpoint()
        self.processor = load_processor(self.checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.pads = {kind: self._token_text(tid) for kind, tid in (("image", self.spec.image_token),
                                                                    ("video", self.spec.video_token))}
        self.stop_ids = {self.spec.eos} if self.spec.eos is not None else set()
        for name in self.spec.stop_tokens:
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                self.stop_ids.add(tid)
        self.llm = LlmRuntime(self.llm_dir, self.spec, self.family, merge_size=self.dims.vision.merge_size,
                              tokens_per_second=self.dims.vision.tokens_per_second)
        self.visual = VisualRuntime(self.visual_dir, self.visual_spec, self.family, self.preprocess)

    # -- checks ---------------------------------------------------------------------------------------------
    def _token_text(self, tid: int) -> str:
        text = self.tokenizer.convert_ids_to_tokens(tid)
        if not text or self.tokenizer.convert_tokens_to_ids(text) != tid:
            raise QvlcError(f"the tokenizer of {self.checkpoint} has no token for vision pad id {tid}",
                            fix="pass --checkpoint the folder the artifacts were compiled from", key="--checkpoint")
        return text

    def _check_pair(self, llm_m: Manifest, vis_m: Manifest) -> None:
        """Same source weights (sha256), matching widths and patch layout; dtypes may differ (the vision rows
        are cast to the LLM's dtype, as the embedding table's rows are)."""
        if llm_m.source.weights != vis_m.source.weights or llm_m.family != vis_m.family:
            raise QvlcError(
                f"{self.llm_dir} and {self.visual_dir} were compiled from different checkpoints "
                f"({llm_m.source.checkpoint!r} vs {vis_m.source.checkpoint!r}: weight hashes differ)",
                fix="compile both parts from the same model.checkpoint", key="VISUAL_DIR")
        if self.visual_spec.deepstack != self.spec.deepstack_layers:
            raise QvlcError(f"the visual artifact outputs {self.visual_spec.deepstack} DeepStack embeddings, the LLM "
                            f"takes {self.spec.deepstack_layers}", fix="compile both parts from the same "
                            "model.checkpoint", key="VISUAL_DIR")
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
        d, s = self.dims, self.spec
        if (d.text.hidden, d.text.vocab, d.tokens.image, d.family) != (s.hidden, s.vocab, s.image_token,
                                                                        self.family.model_type):
            raise QvlcError(
                f"checkpoint {self.checkpoint} ({d.family}, hidden {d.text.hidden}, vocab {d.text.vocab}, image "
                f"token {d.tokens.image}) does not match the LLM artifact ({self.family.model_type}, hidden "
                f"{s.hidden}, vocab {s.vocab}, image token {s.image_token})",
                fix="pass --checkpoint the folder the artifacts were compiled from", key="--checkpoint")

    # -- prompt -----------------------------------------------------------------------------------------------
    def messages(self, n_images: int, prompt: str, n_videos: int = 0) -> list[dict]:
        """One user turn: the images, then the videos, then the prompt (Qwen-VL's usual order)."""
        return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                             *({"type": "video"} for _ in range(n_videos)),
                                             {"type": "text", "text": prompt}]}]

    def prepare(self, images: Sequence[ImageLike | Path | str], prompt: str,
                videos: Sequence[Video] = ()) -> VlmPrompt:
        """One user turn (images, videos, prompt) → ``prepare_chat``."""
        return self.prepare_chat(self.messages(len(images), prompt, len(videos)), images, videos)

    def prepare_chat(self, messages: list[dict], images: Sequence[ImageLike | Path | str] = (),
                     videos: Sequence[Video] = (), preprocess: PreprocessConfig | None = None) -> VlmPrompt:
        """Chat messages (transformers' format: ``content`` a string or parts ``{"type": "text"|"image"|"video"}``)
        through the checkpoint's chat template → host preprocessing of each image and video (preprocess.json) → ids
        with each pad token expanded to its item's t*h*w / merge² tokens (what the Qwen processors do with the same
        grids). ``images`` and ``videos`` are in the order their parts appear; ``preprocess`` replaces the artifact's
        preprocess.json (``qvlc eval --min-pixels/--max-pixels``)."""
        pre = preprocess or self.preprocess
        pil = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        text = render_chat(self.processor, messages)
        queue = {"image": [image_to_patches(im, pre) for im in pil],
                 "video": [video_to_patches(list(v.frames), pre) for v in videos]}
        pieces = re.split(f"({re.escape(self.pads['image'])}|{re.escape(self.pads['video'])})", text)
        kinds = ["image" if p == self.pads["image"] else "video" for p in pieces[1::2]]
        if [kinds.count(k) for k in ("image", "video")] != [len(pil), len(videos)]:
            raise QvlcError(f"the templated prompt holds {kinds.count('image')} image and {kinds.count('video')} "
                            f"video pads for {len(pil)} images and {len(videos)} videos",
                            fix="do not write vision pad tokens in the prompt text, and use the checkpoint's own "
                            "chat_template", key="prompt")
        unit, items, expanded = self.visual_spec.merge_unit, [], pieces[0]
        clips = list(videos)
        for kind, after in zip(kinds, pieces[2::2]):
            pixels, grid = queue[kind].pop(0)
            items.append((kind, pixels, grid))
            if kind == "video" and self.family.frames_as_grids:
                expanded, after = self._frame_spans(expanded, after, grid, clips.pop(0))
            else:
                expanded += self.pads[kind] * int(grid.prod() // unit)
            expanded += after
        ids = np.asarray(self.tokenizer(expanded)["input_ids"], dtype=np.int64)  # as the processors call it
        tps = self.preprocess.temporal_patch_size
        return VlmPrompt(text, ids, tuple(items), tuple(v.second_per_grid(tps) for v in videos),
                         sum(int(g.prod()) for _, _, g in items) // unit)

    def _frame_spans(self, before: str, after: str, grid: np.ndarray, video: Video) -> tuple[str, str]:
        """Qwen3-VL's processor: the template's <vision_start><video_pad><vision_end> becomes, per temporal patch,
        ``<{t:.1f} seconds>`` + vision_start + its pads + vision_end, t the mean time of the patch's frames."""
        start, end = (self.tokenizer.convert_ids_to_tokens(t) for t in (self.spec.vision_start, self.spec.vision_end))
        before = before[:-len(start)] if before.endswith(start) else before
        after = after[len(end):] if after.startswith(end) else after
        tps = self.preprocess.temporal_patch_size
        times = video.frame_times()
        times += times[-1:] * (-len(times) % tps)
        per_frame = int(grid[1] * grid[2]) // self.visual_spec.merge_unit
        spans = "".join(f"<{(times[i] + times[i + tps - 1]) / 2:.1f} seconds>{start}{self.pads['video'] * per_frame}"
                        f"{end}" for i in range(0, int(grid[0]) * tps, tps))
        return before + spans, after

    # -- graphs -----------------------------------------------------------------------------------------------
    def vision_rows(self, prompt: VlmPrompt) -> dict[str, np.ndarray | None]:
        """Image and video rows [tokens, H] in prompt order; items are packed into as few visual calls as fit N."""
        calls: list[list[int]] = [[]]
        for i, (_, _, grid) in enumerate(prompt.items):
            if calls[-1] and sum(int(prompt.items[j][2].prod()) for j in calls[-1]) + grid.prod() > \
                    self.visual_spec.max_patches:
                calls.append([])
            calls[-1].append(i)
        rows: list[np.ndarray] = []
        for call in (c for c in calls if c):
            out = self.visual.run(np.concatenate([prompt.items[j][1] for j in call]),
                                  np.stack([prompt.items[j][2] for j in call]))
            sizes = [int(prompt.items[j][2].prod()) // self.visual_spec.merge_unit for j in call]
            rows += np.split(out, np.cumsum(sizes)[:-1])
        by_kind = {k: [r for (kind, _, _), r in zip(prompt.items, rows) if kind == k] for k in ("image", "video")}
        return {k: (np.concatenate(v) if v else None) for k, v in by_kind.items()}

    def check_fits(self, prompt: VlmPrompt) -> None:
        """QvlcError (key ``export.prefill_len``) when the prompt is longer than the prefill window S."""
        S, n = self.spec.prefill_len, len(prompt.input_ids)
        if n > S:
            raise QvlcError(f"the prompt is {n} tokens ({prompt.image_tokens} of them image/video tokens), the LLM "
                            f"artifact's prefill window holds {S}",
                            fix=f"shorten the prompt or use smaller images/videos, or recompile the LLM part with "
                                f"export.prefill_len >= {-(-n // 16) * 16}", key="export.prefill_len")

    def check_media(self, prompt: VlmPrompt) -> None:
        """QvlcError (key ``export.max_patches``) when one image or video alone needs more patches than N."""
        for _, _, grid in prompt.items:
            fit_grids(np.asarray(grid)[None], self.visual_spec.max_patches)

    def media(self, prompt: VlmPrompt, rows: dict[str, np.ndarray | None]) -> Media:
        (im, im_deep), (vid, vid_deep) = (split_deepstack(rows[k], self.spec.hidden) for k in ("image", "video"))
        return Media(prompt.grids("image"), im, prompt.grids("video"), vid, prompt.second_per_grid_ts, im_deep,
                     vid_deep)

    # -- generation -------------------------------------------------------------------------------------------
    def check_new_tokens(self, max_new_tokens: int) -> None:
        """QvlcError unless 1 <= max_new_tokens <= the KV room (max_context - prefill_len)."""
        s = self.spec
        room = s.max_context - s.prefill_len
        if not 1 <= max_new_tokens <= room:
            raise QvlcError(f"max_new_tokens is {max_new_tokens}; the LLM artifact's KV cache leaves room for "
                            f"{room} new tokens (max_context {s.max_context} - prefill_len {s.prefill_len})",
                            fix=f"use 1 <= max_new_tokens <= {room}, or recompile with a larger export.max_context",
                            key="export.max_context" if max_new_tokens > room else "max_new_tokens")

    def generate(self, images: Sequence[ImageLike | Path | str], prompt: str, max_new_tokens: int = 32,
                 stop_at_eos: bool = True, on_token: TokenCallback | None = None,
                 videos: Sequence[Video] = ()) -> VlmResult:
        """Greedy generation; ``on_token(id, text)`` receives each token and its new text (may be "", e.g. for a
        special token or an incomplete UTF-8 sequence; the held-back text comes with a later token)."""
        self.check_new_tokens(max_new_tokens)
        t0 = time.perf_counter()
        return self.generate_prepared(self.prepare(images, prompt, videos), max_new_tokens, stop_at_eos, on_token, t0)

    def generate_prepared(self, prepared: VlmPrompt, max_new_tokens: int, stop_at_eos: bool = True,
                          on_token: TokenCallback | None = None, t0: float | None = None) -> VlmResult:
        """Greedy generation from a prepared prompt. ``on_token`` may return True to stop after that token (a stop
        string the caller found in the text); the result then holds the tokens up to it."""
        t0 = time.perf_counter() if t0 is None else t0
        self.check_new_tokens(max_new_tokens)
        self.check_fits(prepared)  # before the visual graph runs
        self.check_media(prepared)
        window = self.llm.prompt_window(prepared.input_ids, self.media(prepared, self.vision_rows(prepared)))
        stream = StreamDecoder(self.tokenizer)
        ttft = 0.0

        def emit(tok: int, last: bool) -> bool:
            nonlocal ttft
            if not ttft:
                ttft = time.perf_counter() - t0
            piece = stream.push(tok)
            if last:  # flush what the stream decoder held back, with the last token
                piece += stream.finish()[1]
            return bool(on_token(tok, piece)) if on_token is not None else False

        logits = self.llm.logits_of(self.llm.prefill_window(window))
        tokens = self.llm.greedy(logits, window.delta, max_new_tokens, self.stop_ids if stop_at_eos else None, emit)
        stopped = stop_at_eos and tokens[-1] in self.stop_ids
        return VlmResult(tokens, stream.finish()[0], len(prepared.input_ids), prepared.image_tokens, stopped, ttft,
                         time.perf_counter() - t0)
