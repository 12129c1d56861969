"""Checkpoint folders, for every family: the checks done before any weight is loaded (the folder, config.json,
remote code, the weight files and their safetensors headers against the family's shapes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvlc.checkpoint.json_files import field_error, read_json_object
from qvlc.errors import CheckpointError, printable, quoted

if TYPE_CHECKING:
    import torch

    from qvlc.models.common.family import Family

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 << 20  # a safetensors header's JSON (7B: ~60 KB)
VISUAL_PREFIXES = ("visual.", "model.visual.")  # released checkpoints / transformers >= 4.52 names


def require_folder(folder: Path) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file; a checkpoint is a folder",
                              fix="give the folder that holds config.json and the *.safetensors files",
                              key="model.checkpoint")
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(folder)!r} does not exist",
            fix="give a local Hugging Face folder (config.json + *.safetensors), or 'tiny' for the embedded default",
            key="model.checkpoint",
        )
    return folder


def read_config_json(folder: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    return read_json_object(Path(folder) / CONFIG_NAME, fix="restore the config.json that ships with the checkpoint",
                            missing_fix="point model.checkpoint at a Hugging Face model folder")


REMOTE_CODE_FILES = (CONFIG_NAME, "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                     "video_preprocessor_config.json", "generation_config.json")


def refuse_remote_code(folder: Path) -> None:
    """A checkpoint whose configs name Python code (``auto_map``) is refused: qvlc never runs checkpoint code
    (every load also passes ``trust_remote_code=False``), and transformers would otherwise ask on the terminal."""
    for name in REMOTE_CODE_FILES:
        path = Path(folder) / name
        if path.is_file() and path.stat().st_size < (16 << 20) and '"auto_map"' in path.read_text(errors="replace"):
            raise CheckpointError(f"{path} asks to run Python code from the checkpoint (auto_map); qvlc never runs "
                                  "checkpoint code", fix="use the model's own transformers classes: remove auto_map "
                                  "(and the .py files it names) from the checkpoint", key="model.checkpoint")


def index_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard name), every entry a string."""
    weight_map = read_json_object(index, fix="restore the index that ships with the checkpoint").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise field_error(index, "weight_map", weight_map, "an object of tensor name -> shard file name")
    return weight_map


def _index_names(index: Path) -> list[str]:
    """The shard names of model.safetensors.index.json: plain file names in the folder (never a path)."""
    weight_map = index_weight_map(index)
    names = sorted(set(weight_map.values()))
    if not names:
        raise CheckpointError(f"{index} lists no weight files (its weight_map is empty)",
                              fix="restore the index that ships with the checkpoint", key="model.checkpoint")
    bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{index} names a shard outside the checkpoint folder: {quoted(bad[0])}",
                              fix="a weight_map names files beside the index, e.g. model-00001-of-00002.safetensors",
                              key="model.checkpoint")
    return names


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint folder needs; raises if any is missing."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        names = _index_names(index)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is incomplete: {len(missing)} of {len(names)} weight shards are missing "
                f"(first: {missing[0]})",
                fix="finish downloading the checkpoint (all files listed in model.safetensors.index.json)",
                key="model.checkpoint",
            )
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    raise CheckpointError(
        f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}",
        fix="qvlc reads safetensors checkpoints; re-save the model with save_pretrained(safe_serialization=True)",
        key="model.checkpoint",
    )


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _entry_ok(t: Any) -> bool:
    """A header entry whose dtype is known and whose byte range is exactly its shape's size."""
    try:
        start, end = t["data_offsets"]
        count = 1
        for d in t["shape"]:
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:  # JSON true is not a dimension
                return False
            count *= d
        return all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)) and 0 <= start <= end \
            and end - start == count * DTYPE_BYTES[t["dtype"]]
    except (KeyError, TypeError, ValueError):
        return False


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file; CheckpointError when the file is cut short or not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size or n > MAX_HEADER:
            raise CheckpointError(f"{path} is not a complete safetensors file ({size} bytes)",
                                  fix="download the file again", key="model.checkpoint")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise CheckpointError(f"{path} has a damaged safetensors header ({what})", fix="download the file again",
                                  key="model.checkpoint") from None
    tensors = {k: t for k, t in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(_entry_ok(t) for t in tensors.values()):
        bad = "not a JSON object" if tensors is None else \
            next(f"tensor {quoted(k)}: {quoted(t, 160)}" for k, t in tensors.items() if not _entry_ok(t))
        raise CheckpointError(f"{path} has a malformed safetensors header ({bad}): its dtype, shape and byte range "
                              "must agree", fix="download the file again", key="model.checkpoint")
    end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path} holds {size} bytes but its header describes {8 + n + end}: the file is "
                              "truncated or damaged", fix="download the file again", key="model.checkpoint")
    return tensors


def check_weight_shapes(folder: Path, family: "Family", config: dict, vision_only: bool = False,
                        imported=None) -> None:
    """Every weight file complete, and every tensor the model needs present with its shape (read from the
    safetensors headers and a meta-device model: no weight is read). ``vision_only``: only the vision tower's
    tensors, all a visual compile reads (a checkpoint of the tower alone compiles its visual part)."""

    found: dict[str, list[int]] = {}
    where: dict[str, str] = {}  # tensor → the weight file holding it, for messages
    files = weight_files(folder)
    for file in files:
        header = _header(file)
        found.update({k: t["shape"] for k, t in header.items()})
        where.update(dict.fromkeys(header, file.name))
    shown = ", ".join(f.name for f in files[:2]) + (f" and {len(files) - 2} more" if len(files) > 2 else "")
    model = meta_model(folder, family, config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in model.state_dict().items():
        if vision_only and not name.startswith("model.visual."):
            continue
        names = [name, released_name(name)]
        have = next((found[n] for n in names if n in found), None)
        packed = next((n[:-len("weight")] for n in names
                       if n.endswith(".weight") and n[:-len("weight")] + "qweight" in found),
                      None) if imported is not None else None
        if have is None and packed is not None:  # an imported GPTQ/AWQ Linear: its packed tensors' shapes
            for part, shape in imported.shapes(*p.shape).items():
                if found.get(packed + part) != shape:
                    raise CheckpointError(f"{folder}: tensor {packed + part!r} has shape {found.get(packed + part)}, "
                                          f"config.json implies {shape}", fix="use the config.json that ships with "
                                          "these weights", key="model.checkpoint")
            continue
        if have is None:
            if tied and name == "lm_head.weight":
                continue
            raise CheckpointError(f"{folder}: no tensor {names[-1]!r} in {shown}", fix="use a complete checkpoint of "
                                  "this model (every file listed in its index)", key="model.checkpoint")
        if list(have) != list(p.shape):
            file = next(where[n] for n in names if n in where)
            raise CheckpointError(f"{folder}: tensor {names[-1]!r} in {file} has shape {list(have)}, config.json "
                                  f"implies {list(p.shape)}", fix="use the config.json that ships with these weights",
                                  key="model.checkpoint")


def meta_model(folder: Path, family: "Family", config: dict) -> "torch.nn.Module":
    """transformers' model of ``config`` on the meta device (no memory): the tensors a checkpoint must hold.
    transformers reads every field of config.json, typed or not: a value it cannot take is a CheckpointError
    naming config.json, not a crash inside transformers."""
    import torch

    try:
        with torch.device("meta"):
            return family.hf_class("model")(family.hf_class("config")(**config))
    except Exception as exc:  # noqa: BLE001 — transformers raises any kind on a mistyped field
        raise CheckpointError(f"{Path(folder) / CONFIG_NAME}: transformers cannot build the model it describes "
                              f"({type(exc).__name__}: {printable(exc, 200)})",
                              fix="restore the config.json that ships with the checkpoint", key="model.checkpoint") \
            from None


def released_name(name: str) -> str:
    """transformers 4.57 module names → the key names of the released checkpoints (what save_pretrained writes)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name
