"""The checkpoint's chat template, rendered with a time limit.

A chat template is code from the checkpoint: transformers runs it in Jinja's sandbox, which stops file and attribute
access but not work — two nested ``range(100000)`` loops hang `qvlc run` for hours. Rendering is traced, and a
template still running after ``TEMPLATE_SECONDS`` is stopped with an error naming it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from qvlc.errors import QvlcError

TEMPLATE_SECONDS = 10.0  # a real template renders in milliseconds


class _TemplateTimeout(Exception):
    pass


def render_chat(processor: Any, messages: list[dict], seconds: float = TEMPLATE_SECONDS) -> str:
    """``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``, stopped after
    ``seconds`` (QvlcError, key ``chat_template``)."""
    deadline = time.monotonic() + seconds
    previous = sys.gettrace()

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TemplateTimeout
        return tracer

    sys.settrace(tracer)
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except _TemplateTimeout:
        raise QvlcError(f"the checkpoint's chat template was still rendering after {seconds:.0f} s and was stopped",
                        fix="use the chat_template that ships with the model (chat_template.json or "
                            "tokenizer_config.json in the checkpoint)", key="chat_template") from None
    finally:
        sys.settrace(previous)
