"""The tiny tokenizer shipped with qvlc: files, layout of the special tokens, chat template, processor."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Qwen2Tokenizer, Qwen2VLProcessor

from qvlc.checkpoint import build_tiny_tokenizer
from qvlc.checkpoint.processor import read_preprocess_config
from qvlc.checkpoint.tiny import build_random_checkpoint, shipped_config
from qvlc.checkpoint.tokenizer import (
    load_processor,
    save_tiny_tokenizer_if_matching,
    tiny_tokenizer_files,
)
from qvlc.errors import QvlcError
from qvlc.host.preprocess import image_to_patches

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

SPECIALS = {
    "<|endoftext|>": 1000, "<|im_start|>": 1001, "<|im_end|>": 1002, "<|object_ref_start|>": 1003,
    "<|object_ref_end|>": 1004, "<|box_start|>": 1005, "<|box_end|>": 1006, "<|quad_start|>": 1007,
    "<|quad_end|>": 1008, "<|vision_start|>": 1009, "<|vision_end|>": 1010, "<|vision_pad|>": 1011,
    "<|image_pad|>": 1012, "<|video_pad|>": 1013,
}
TEXTS = [
    "Describe this image.",
    "Hello world! It's 2024-11-25, and the price is $3.50 (12% off).",
    "  leading spaces, trailing spaces  \n\nnew lines\ttabs\r\n",
    "naïve café, Zürich, 東京, emoji 🙂 — unseen bytes still round-trip",
    "zzqx xylophone quokka",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(shipped_config("tiny"), tmp_path_factory.mktemp("tok") / "ck", seed=0)


@pytest.fixture(scope="module")
def processor(checkpoint: Path) -> Qwen2VLProcessor:
    return load_processor(checkpoint)


def test_shipped_files_are_what_the_builder_writes() -> None:
    shipped = {p.name: p.read_text(encoding="utf-8") for p in tiny_tokenizer_files()}
    built = build_tiny_tokenizer.tokenizer_files()
    assert sorted(shipped) == sorted(built)
    for name, text in built.items():
        assert shipped[name] == text, f"{name} is stale: run python -m qvlc.checkpoint.build_tiny_tokenizer"


def test_checkpoint_folder_gets_the_tokenizer(checkpoint: Path) -> None:
    for src in tiny_tokenizer_files():
        assert (checkpoint / src.name).read_bytes() == src.read_bytes()
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()


def test_full_size_config_gets_no_tokenizer(tmp_path: Path) -> None:
    for name in ("qwen2_vl_2b", "qwen2_vl_7b"):
        save_tiny_tokenizer_if_matching(shipped_config(name), tmp_path)
    save_tiny_tokenizer_if_matching({**shipped_config("tiny"), "image_token_id": 1013}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_auto_processor_on_tiny_checkpoint(checkpoint: Path) -> None:
    """AutoProcessor gives a Qwen2VLProcessor; transformers 4.57 cannot build one without torchvision."""
    if HAS_TORCHVISION:
        assert isinstance(AutoProcessor.from_pretrained(checkpoint), Qwen2VLProcessor)
    else:
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(checkpoint)


def test_load_processor_gives_qwen2_vl_processor(processor: Qwen2VLProcessor, checkpoint: Path) -> None:
    assert isinstance(processor, Qwen2VLProcessor)
    config = json.loads((checkpoint / "config.json").read_text())
    tok = processor.tokenizer
    assert processor.image_token_id == config["image_token_id"] == 1012
    assert processor.video_token_id == config["video_token_id"] == 1013
    assert tok.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_end|>") == config["vision_end_token_id"]
    assert tok.eos_token_id == config["eos_token_id"] == 1002
    assert len(tok) == 1014 <= config["vocab_size"]
    assert max(tok.get_vocab().values()) < config["vocab_size"]


def test_special_tokens_have_qwen2_vl_ids(processor: Qwen2VLProcessor) -> None:
    tok = processor.tokenizer
    for content, token_id in SPECIALS.items():
        assert tok.encode(content) == [token_id], content
    assert tok.encode("<|im_end|>") == [1002]
    assert tok.decode([1001, 1002], skip_special_tokens=True) == ""


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_round_trips(processor: Qwen2VLProcessor, text: str) -> None:
    ids = processor.tokenizer.encode(text)
    assert ids and max(ids) < 1000
    assert processor.tokenizer.decode(ids) == text


def test_slow_tokenizer_files_agree_with_fast(checkpoint: Path, processor: Qwen2VLProcessor) -> None:
    slow = Qwen2Tokenizer.from_pretrained(checkpoint)
    for text in [*TEXTS, "<|im_start|>user\nHi<|im_end|>"]:
        assert slow.encode(text) == processor.tokenizer.encode(text), text
    fast = AutoTokenizer.from_pretrained(checkpoint)
    assert fast.encode(TEXTS[1]) == processor.tokenizer.encode(TEXTS[1])


def test_chat_template_renders_qwen2_vl_format(processor: Qwen2VLProcessor) -> None:
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image."}, {"type": "video"},
    ]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image."
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."}]
    assert processor.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    numbered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Picture 2: <|vision_start|>" in numbered


def test_processor_expands_image_pad(processor: Qwen2VLProcessor, checkpoint: Path) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    out = processor(text=[text], images=[image], return_tensors="np")
    ids = out["input_ids"][0].tolist()
    t, h, w = out["image_grid_thw"][0].tolist()
    n = t * h * w // 4
    assert n == 20
    start = ids.index(1009)
    assert ids[start + 1:start + 1 + n] == [1012] * n
    assert ids[start + 1 + n] == 1010
    assert ids.count(1012) == n and ids.count(1009) == 1
    assert max(ids) < 1024
    # the processor's pixels are the host preprocessing's, exactly
    pixel_values, grid = image_to_patches(image, read_preprocess_config(checkpoint))
    np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
    np.testing.assert_allclose(pixel_values, out["pixel_values"], rtol=0, atol=1e-6)


def test_processor_videos(processor: Qwen2VLProcessor) -> None:
    video = np.random.default_rng(1).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    text = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    if HAS_TORCHVISION:
        out = processor(text=[text], videos=[video], return_tensors="pt")
        t, h, w = out["video_grid_thw"][0].tolist()
        assert (out["input_ids"][0] == 1013).sum().item() == t * h * w // 4 == 12
    else:
        with pytest.raises(QvlcError, match="torchvision"):
            processor(text=[text], videos=[video])


def test_load_processor_without_tokenizer_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(shipped_config("tiny")))
    with pytest.raises(QvlcError, match="no tokenizer") as err:
        load_processor(tmp_path)
    assert "tokenizer.json" in err.value.fix
    with pytest.raises(QvlcError, match="does not exist"):
        load_processor(tmp_path / "missing")
