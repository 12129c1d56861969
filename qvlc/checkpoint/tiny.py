"""The embedded defaults (a small random model per family, saved and loaded like any real checkpoint) and the
random full-size checkpoints the benchmarks compile."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from qvlc.checkpoint.load import released_name

if TYPE_CHECKING:
    from qvlc.models.common.family import Family

TINY_SEED = 20241125
# Bump when the recipe below changes, so cached folders built by an older recipe are not reused.
RECIPE_VERSION = 6
# The tiny vision tower's attention is near-uniform at transformers' init (std 0.02): dropping its rotary moved
# the output by 1.3e-5, below the fp32 tolerance. At std 0.3 for its qkv weights the same bug moves it by 4.5e-2,
# so a rotary or mask bug in the visual graph fails the compile's own parity check, in fp32 and in fp16.
TINY_VISION_QKV_STD = 0.3


def _family(family: "Family | None") -> "Family":
    from qvlc.models import DEFAULT_FAMILY
    from qvlc.models import family as family_of

    return family if family is not None else family_of(DEFAULT_FAMILY)


def shipped_config(name: str, family: "Family | None" = None) -> dict:
    """A config.json shipped with a family (default Qwen2-VL): 'tiny', or a full-size model's such as
    'qwen2_vl_2b' or 'qwen2_5_vl_7b'."""
    return _family(family).shipped_config(name)


def cache_root() -> Path:
    return Path(os.environ.get("QVLC_CACHE", Path.home() / ".cache" / "qvlc"))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float | None = None,
               vision_qkv_std: float | None = None) -> None:
    """Give every weight, bias and norm scale a random value.

    transformers' init leaves biases at 0 and norm scales at 1: a sliced bias or a swapped norm would then
    go unnoticed. Random values make every wiring and slicing mistake change the numbers. ``vision_qkv_std``
    sharpens the vision tower's attention so that rotary and mask mistakes change them too.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if vision_qkv_std is not None and "visual" in name and name.endswith("attn.qkv.weight"):
            p.copy_(torch.randn(p.shape, generator=gen) * vision_qkv_std)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif "norm" in name or name.endswith(("ln_q.weight",)):
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
        elif std is not None:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_random_checkpoint(config: dict, folder: Path, seed: int, dtype: torch.dtype = torch.float32,
                            std: float | None = None, vision_qkv_std: float | None = None,
                            family: "Family | None" = None) -> Path:
    """Build a random model of ``family`` (default Qwen2-VL) from ``config`` and save_pretrained it into
    ``folder`` (atomically)."""
    from qvlc.checkpoint.tokenizer import save_tiny_tokenizer_if_matching

    fam = _family(family)
    folder = Path(folder)
    torch.manual_seed(seed)
    model = fam.hf_class("model")(fam.hf_class("config")(**config)).to(dtype)
    randomize_(model, seed, std, vision_qkv_std)
    with _written_atomically(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        save_tiny_tokenizer_if_matching(config, staging)
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            own = resources.files(fam.package).joinpath(f"configs/tiny_{name}")
            if own.is_file():  # a family whose images are cut otherwise (Qwen3-VL: 16-px patches, mean/std 0.5)
                (staging / name).write_text(own.read_text())
    return folder


@contextlib.contextmanager
def _written_atomically(folder: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``folder``; replace ``folder`` with it only if the block completes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def tiny_checkpoint(overrides: dict | None = None, seed: int = TINY_SEED, family: "Family | None" = None) -> Path:
    """Path of a family's tiny default checkpoint (default Qwen2-VL; built on first use, then cached).

    ``overrides`` patch the shipped tiny config (tests use it for other head counts); the cache key covers
    the config, the seed, the recipe and the transformers version.
    """
    import transformers

    fam = _family(family)
    config = fam.shipped_config("tiny")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    key = hashlib.sha256(
        json.dumps([config, seed, RECIPE_VERSION, transformers.__version__, fam.tiny_std], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = cache_root() / f"tiny-{key}"
    if not (folder / "config.json").is_file():
        build_random_checkpoint(config, folder, seed, std=fam.tiny_std, vision_qkv_std=TINY_VISION_QKV_STD,
                                family=fam)
    return folder


@torch.no_grad()
def _shards(params: list, itemsize: int, shard_bytes: int) -> list[list]:
    """``params`` in order, cut into shards of at most ``shard_bytes`` (a tensor larger than that alone)."""
    shards: list[list] = [[]]
    size = 0
    for name, p in params:
        nbytes = p.numel() * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, p))
        size += nbytes
    return shards


def _random_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Matrices ~ N(0, 0.02), biases ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1); each from its own seeded generator."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    x = torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return x * 0.1
    if "norm" in name or name.endswith("ln_q.weight"):
        return 1.0 + x * 0.1
    return x * 0.02


def write_random_checkpoint_streaming(config: dict, folder: Path, seed: int, dtype: torch.dtype = torch.bfloat16,
                                      shard_bytes: int = 2 << 30, family: "Family | None" = None,
                                      vision_only: bool = False) -> Path:
    """A random checkpoint of ``family`` (default Qwen2-VL) written shard by shard, never holding the model in memory.

    For full-size shapes that do not fit this machine as a model (7B in fp32 is ~33 GB): the module tree is
    built on the meta device for names and shapes, each tensor is drawn from its own seeded generator and
    written into safetensors shards with an index, in the layout of the released checkpoints. Matrices ~
    N(0, 0.02), biases ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1). ``vision_only`` writes only the vision tower's
    tensors (all a visual compile reads).
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    fam = _family(family)
    folder = Path(folder)
    cfg = fam.hf_class("config")(**config)
    with torch.device("meta"):
        meta = fam.hf_class("model")(cfg)
    params = [(n, p) for n, p in meta.named_parameters()]
    if cfg.tie_word_embeddings:
        params = [(n, p) for n, p in params if n != "lm_head.weight"]
    if vision_only:
        params = [(n, p) for n, p in params if released_name(n).startswith("visual.")]
    with _written_atomically(folder) as staging:
        weight_map = {}
        shards = _shards(params, torch.finfo(dtype).bits // 8, shard_bytes)
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {released_name(n): _random_tensor(n, p.shape, seed).to(dtype) for n, p in names}
            weight_map.update(dict.fromkeys(tensors, file))
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            del tensors
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(s.numel() * torch.finfo(dtype).bits // 8 for _, s in params)},
             "weight_map": weight_map}, indent=2, sort_keys=True))
        cfg.dtype = dtype
        cfg.save_pretrained(staging)
        GenerationConfig.from_model_config(cfg).save_pretrained(staging)
    return folder
