"""Tokenizer helpers: the tiny tokenizer shipped with qvlc, and loading a checkpoint's processor."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from qvlc.checkpoint.json_files import field_error, read_json_object
from qvlc.checkpoint.load import refuse_remote_code, require_folder
from qvlc.errors import CheckpointError, QvlcError, printable

TINY_TOKENIZER_PACKAGE_DIR = "tiny_tokenizer"
TINY_VOCAB_SIZE = 1024
TINY_IMAGE_TOKEN_ID = 1012

# A folder is loadable by a Qwen2 tokenizer with tokenizer.json (fast) or vocab.json + merges.txt (slow).
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
PROCESSOR_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                        "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                        "generation_config.json", "tokenizer.json", "vocab.json")


def tiny_tokenizer_files() -> list[Path]:
    """The files of the shipped tiny tokenizer (tokenizer, chat template, preprocessor config), sorted."""
    folder = resources.files("qvlc.checkpoint").joinpath(TINY_TOKENIZER_PACKAGE_DIR)
    return sorted(Path(str(f)) for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def is_tiny_layout(config: dict[str, Any]) -> bool:
    """True when ``config`` uses the tiny token layout (vocab 1024, image pad at id 1012)."""
    text = {**config, **(config.get("text_config") or {})}
    return text.get("vocab_size") == TINY_VOCAB_SIZE and config.get("image_token_id") == TINY_IMAGE_TOKEN_ID


def save_tiny_tokenizer_if_matching(config: dict[str, Any], folder: Path) -> None:
    """Copy the tiny tokenizer into ``folder`` when ``config`` has the tiny token layout; else do nothing."""
    if not is_tiny_layout(config):
        return
    folder = Path(folder)
    for src in tiny_tokenizer_files():
        shutil.copyfile(src, folder / src.name)


def has_tokenizer(folder: Path) -> bool:
    """True when ``folder`` holds tokenizer.json, or vocab.json and merges.txt."""
    return any(all((Path(folder) / n).is_file() for n in names) for names in _TOKENIZER_FILE_SETS)


def load_processor(folder: Path) -> Any:
    """The checkpoint's ``Qwen2VLProcessor`` via ``transformers.AutoProcessor.from_pretrained(folder)``, offline.

    The image processor is the slow ``Qwen2VLImageProcessor`` (PIL resize), which ``qvlc.host.preprocess``
    reproduces exactly; with torchvision installed AutoProcessor would pick the fast one (torchvision resize,
    up to ~0.03 apart after normalization). transformers 4.57 cannot build the processor at all without
    torchvision (its video processor needs it): then an image-only Qwen2VLProcessor is returned, whose
    ``__call__`` raises QvlcError for videos. Raises CheckpointError when the folder has no tokenizer.
    """
    from transformers import AutoProcessor, Qwen2VLImageProcessor
    from transformers.utils import is_torchvision_available

    folder = require_folder(folder)
    refuse_remote_code(folder)
    if not has_tokenizer(folder):
        raise CheckpointError(
            f"{folder} has no tokenizer (neither tokenizer.json nor vocab.json + merges.txt)",
            fix="copy tokenizer.json, tokenizer_config.json, chat_template.json and preprocessor_config.json "
                "from the original Qwen2-VL-Instruct download into the checkpoint folder",
            key="model.checkpoint",
        )
    for name in PROCESSOR_JSON_FILES:  # every JSON file transformers parses: an object, UTF-8, bounded
        read_json_object(folder / name, required=False)
    try:
        if is_torchvision_available():
            processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            if type(processor.image_processor) is not Qwen2VLImageProcessor:
                processor.image_processor = Qwen2VLImageProcessor.from_pretrained(
                    str(folder), local_files_only=True, trust_remote_code=False)
            return processor
        return _image_only_processor(folder)
    except QvlcError:
        raise
    except Exception as exc:  # noqa: BLE001 — transformers and tokenizers raise any kind on a damaged file
        raise CheckpointError(f"the tokenizer and processor files of {folder} cannot be loaded "
                              f"({type(exc).__name__}: {printable(exc, 200)})",
                              fix="restore tokenizer.json, tokenizer_config.json, chat_template.json and "
                                  "preprocessor_config.json from the original download", key="--checkpoint") from None


def _image_only_processor(folder: Path) -> Any:
    """A Qwen2VLProcessor without video processor (transformers 4.57 needs torchvision for that one)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor for text and images only; videos need torchvision."""

        attributes = ["image_processor", "tokenizer"]

        def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
            if videos is not None:
                raise QvlcError(
                    "transformers' Qwen2-VL video processor needs torchvision, which is not installed",
                    fix="pip install torchvision matching your torch, or use qvlc.host.preprocess.video_to_patches",
                    key="videos",
                )
            return super().__call__(images=images, text=text, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=_chat_template(folder, tokenizer))


def _chat_template(folder: Path, tokenizer: Any) -> str | None:
    """The folder's chat template: chat_template.jinja, chat_template.json, else the tokenizer's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    path = folder / "chat_template.json"
    if path.is_file():
        template = read_json_object(path).get("chat_template")
        if not isinstance(template, str):
            raise field_error(path, "chat_template", template, "a string (a Jinja template)")
        return template
    return getattr(tokenizer, "chat_template", None)
