"""Prompts and answers as VLMEvalKit makes them for Qwen2-VL-family models.

Prompts follow ``vlmeval/vlm/qwen2_vl/prompt.py`` (``_build_mcq_prompt``, ``_build_vqa_prompt``): the image first,
then ``Hint: …``, ``Question: …``, ``Options:`` one per line and the instruction (Chinese when the prompt has CJK
characters). The option letter is read from the answer text by VLMEvalKit's exact-matching rule, ``can_infer``, as it
stands at VLMEvalKit e8e78f0 (2026-08-18; ``vlmeval/utils/matching_util.py``), without its LLM judge: a letter
standing alone among the answer's last five words (exactly one option letter), else "answer is X", else exactly one
option's text inside an answer at most twice as long as all options together; a refusal reads as ``Z``. Open
answers are scored by exact match after normalisation, and by VQA's score (``vqa_score``) over a list of answers.
"""

from __future__ import annotations

import re
import string

MATCHING = "VLMEvalKit can_infer, e8e78f0 (2026-08-18), exact matching (no LLM judge)"
MCQ_EN = "Please select the correct answer from the options above."
MCQ_CN = "请直接回答选项字母。"
VQA = "\nPlease try to answer the question with short words or phrases if possible."
_CJK = re.compile("[\u4e00-\u9fff]")
_ARTICLES = {"a", "an", "the"}
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


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
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    words = answer.translate(_SEPARATORS).split()
    hits = [c for c in letters if c in words]
    if len(hits) == 1 and words.index(hits[0]) > len(words) - 5:  # the position rule: among the last five words
        return hits[0]
    if not hits and "Z" in words:
        return "Z"
    said = _ANSWER_IS.search(answer)
    return said.group(1).upper() if said and said.group(1).upper() in letters else None


def _option_text(answer: str, options: dict[str, str]) -> str | None:
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):  # the length guard
        return None
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_option(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names (``Z``: a refusal), or None when it names none or several."""
    return _option_letter(answer, list(options)) or _option_text(answer, options)


def normalize(text: str) -> str:
    """Exact match's normalisation: case, punctuation (not decimal points), articles, whitespace."""
    text = text.lower().strip()
    text = "".join(" " if c in string.punctuation and c not in ".-" else c for c in text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # periods, not decimal points
    return " ".join(w for w in text.split() if w not in _ARTICLES)


# VQA's answer normalisation (the VQA challenge's evaluation, as VLMEvalKit's ``process_answer`` applies it)
_VQA_PUNCT = ";/[]\"{}()=+\\_->@`,?!<"
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
                 "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "couldnt": "couldn't", "wont": "won't",
                 "wouldnt": "wouldn't", "shouldnt": "shouldn't", "hasnt": "hasn't", "havent": "haven't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                 "whats": "what's", "lets": "let's", "its": "it's"}


def vqa_normalize(answer: str) -> str:
    text = " ".join(answer.replace("\n", " ").replace("\t", " ").split())
    joined = bool(re.search(r"\d,\d", text))
    for p in _VQA_PUNCT:
        text = text.replace(p, "" if (p + " " in answer or " " + p in answer or joined) else " ")
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, answers: list[str]) -> float:
    """VQA's accuracy as VLMEvalKit computes it (``process_line``, ``vqa_score``): for each reference answer, the
    share min(1, matches / 3) of the *other* answers equal to the prediction, averaged. Made for VQAv2's ten
    answers per question; a single reference answer scores 0 by construction."""
    gts = [vqa_normalize(a) for a in answers]
    pred = vqa_normalize(prediction)
    if not gts:
        return 0.0
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)
