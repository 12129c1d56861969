"""Build the tiny tokenizer shipped in ``tiny_tokenizer/``: run ``python -m qvlc.checkpoint.build_tiny_tokenizer``.

A byte-level BPE laid out like Qwen2-VL's: the same normalizer, pre-tokenizer regex and decoder, exactly
1000 regular tokens (ids 0..999) trained on the built-in text below, then Qwen2-VL's 14 special tokens in
Qwen2-VL's order at ids 1000..1013, Qwen2-VL-Instruct's chat template and Qwen2-VL's preprocessor_config.json.
The build is deterministic: running it again writes byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

REGULAR_VOCAB = 1000

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / Qwen2-VL).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# chat_template of Qwen2-VL-2B/7B-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen2-VL-2B/7B-Instruct.
PREPROCESSOR_CONFIG: dict = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# The tiny models' video bounds: 4..16 merged tokens per frame (the real models' 128..768 would not fit the tiny
# prefill windows); qvlc reads them like a real checkpoint's video_preprocessor_config.json.
VIDEO_PREPROCESSOR_CONFIG: dict = {
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 16 * 28 * 28,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "video_processor_type": "Qwen2VLVideoProcessor",
}

CORPUS = """\
A picture is worth a thousand words, and a vision language model has to read both. The image is cut into
small square patches of fourteen by fourteen pixels; two frames in time make one patch, and four
neighbouring patches are merged into a single token before the language model sees them. The assistant
then describes what it sees: a cat sleeping on a red chair, a dog running across the green grass, three
children playing with a yellow ball near the river, or a city street at night with cars, lights and rain.

The compiler turns the model into static graphs. Every shape is fixed before the first weight is loaded:
the prefill length, the context length, the number of patches and the width of each output. When the
graph is exported, the numbers are checked against the original model, token by token and value by value.
If the difference is larger than the tolerance, the build fails and the report says which output moved,
how far it moved, and what to change. Nothing is written twice, and nothing is left half finished.

Describe this image. What is in the picture? How many people are there, and what are they doing?
Please answer in one short sentence. The weather today is sunny with a light wind from the west, and the
temperature will rise to 24 degrees in the afternoon. Tomorrow it may rain; take an umbrella with you.
Questions and answers, numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8 and 9, dates such as 2024-11-25, and prices
of $3.50 or 12% off are all text that the tokenizer must handle without losing a single byte.

Once upon a time, in a small village by the sea, there lived an old fisherman who told stories every
evening. He spoke of storms and stars, of whales that sang under the moon, and of a lighthouse whose keeper
never slept. The children listened quietly, and when the fire burned low, they walked home along the
beach, counting the waves and dreaming of the boats they would sail one day.

Good morning! Could you help me, please? I'm looking for the station; it's not far, isn't it? We've been
walking for an hour, and they'll be waiting for us. You'd better hurry, because the train leaves at noon.
Thank you very much, have a nice day, and see you soon.

Light travels faster than sound, which is why we see lightning before we hear thunder. Water boils at one
hundred degrees at sea level, and freezes at zero. The heart pumps blood through the body, the lungs bring
in air, and the brain keeps everything working together. Plants use sunlight to make food from water and
carbon dioxide, and they give off the oxygen that animals breathe.

Mathematics is the language of patterns. Two plus two makes four, a triangle has three sides, and the
circle's circumference grows with its radius. Engineers measure, estimate and verify; scientists observe,
question and explain. Music, painting and poetry remind us that beauty matters as much as precision.
"""


def train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on CORPUS and add the special tokens at ids 1000..1013."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=REGULAR_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    if tok.get_vocab_size() != REGULAR_VOCAB:
        raise RuntimeError(
            f"the corpus yields {tok.get_vocab_size()} regular tokens, need exactly {REGULAR_VOCAB}: add text to CORPUS"
        )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json in the layout of Qwen2-VL-Instruct's."""
    added = {
        str(REGULAR_VOCAB + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, content in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def special_tokens_map() -> dict:
    """special_tokens_map.json in the layout of Qwen2-VL-Instruct's."""
    return {
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
    }


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def tokenizer_files() -> dict[str, str]:
    """File name → text of every file in ``tiny_tokenizer/``."""
    tok = train_tokenizer()
    bpe = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    vocab = dict(sorted(bpe["vocab"].items(), key=lambda kv: kv[1]))
    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
        "tokenizer_config.json": _dump(tokenizer_config()),
        "special_tokens_map.json": _dump(special_tokens_map()),
        "chat_template.json": _dump({"chat_template": CHAT_TEMPLATE}),
        "preprocessor_config.json": _dump(PREPROCESSOR_CONFIG),
        "video_preprocessor_config.json": _dump(VIDEO_PREPROCESSOR_CONFIG),
    }


def default_folder() -> Path:
    """The shipped ``tiny_tokenizer/`` folder inside the package."""
    return Path(__file__).resolve().parent / "tiny_tokenizer"


def write(folder: Path) -> list[Path]:
    """Write every tokenizer file into ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in tokenizer_files().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    """Regenerate the shipped ``tiny_tokenizer/`` files in place."""
    write(default_folder())


if __name__ == "__main__":
    main()
