"""Prompts and answers as VLMEvalKit makes them for Qwen2-VL-family models.

Prompts follow ``vlmeval/vlm/qwen2_vl/prompt.py`` (``_build_mcq_prompt``, ``_build_vqa_prompt``): the image first,
then ``Hint: …``, ``Question: …``, ``Options:`` one per line and the instruction (Chinese when the prompt has CJK
characters). The option letter is read from the answer text as VLMEvalKit's ``can_infer`` does: a letter standing
alone (exactly one of the options), else exactly one option's text inside the answer. Open answers match after
normalisation (case, punctuation, articles, whitespace).
"""

from __future__ import annotations

import re
import string

MCQ_EN = "Please select the correct answer from the options above."
MCQ_CN = "请直接回答选项字母。"
VQA = "\nPlease try to answer the question with short words or phrases if possible."
_CJK = re.compile("[\u4e00-\u9fff]")
_ARTICLES = {"a", "an", "the"}


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    prompt = f"Hint: {hint}\n" if hint is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        prompt += MCQ_CN if _CJK.search(prompt) else MCQ_EN
    return prompt.rstrip()


def vqa_prompt(question: str) -> str:
    return question + VQA


def messages(prompt: str, with_image: bool) -> list[dict]:
    """One user turn: the image, then the text (VLMEvalKit's order)."""
    parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": parts}]


def _option_letter(answer: str, letters: list[str]) -> str | None:
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    words = mod.split()
    hits = [c for c in letters if c in words]
    return hits[0] if len(hits) == 1 else None


def extract_option(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, or None when it names none or several."""
    letter = _option_letter(answer, list(options))
    if letter is not None:
        return letter
    low = answer.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(" " if c in string.punctuation and c not in ".-" else c for c in text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # periods, not decimal points
    return " ".join(w for w in text.split() if w not in _ARTICLES)
