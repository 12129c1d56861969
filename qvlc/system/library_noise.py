"""Third-party noise off a user's terminal: warnings and library logs, in this process and every child it starts.

A leaf: no qvlc import, and torch is imported only when quieting is called. ``QVLC_VERBOSE=1`` keeps everything.
"""

from __future__ import annotations

import logging
import os
import warnings

LOGGERS = ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export", "torch.export",
           "onnxscript", "transformers")


def verbose() -> bool:
    return bool(os.environ.get("QVLC_VERBOSE"))


def quiet_libraries() -> None:
    """Silence Python warnings and the exporters' and transformers' loggers (unless ``QVLC_VERBOSE`` is set).

    The environment carries it into spawned children (export workers) from their first line: ``PYTHONWARNINGS``
    covers warnings raised while a child unpickles its job, before its initializer could filter them; each child
    calls this again for the loggers, which a spawned process creates afresh.
    """
    if verbose():
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch.onnx  # noqa: F401  (its loggers exist only once imported)

    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
