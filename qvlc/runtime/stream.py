"""Incremental detokenization for streamed generation."""

from __future__ import annotations


class StreamDecoder:
    """Incremental detokenization: the new text of each token, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # window start: enough context for byte-level merges
        self.read = 0  # tokens whose text was already emitted
        self.emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)
            self.emitted += piece
            return piece
        return ""

    def finish(self) -> tuple[str, str]:
        """(the full text, what of it was not emitted yet)."""
        text = self._decode(self.tokens)
        rest = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        return text, rest
