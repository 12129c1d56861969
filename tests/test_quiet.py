"""No third-party warning reaches a user's terminal unless QVLC_VERBOSE=1: in the parent and in the spawned export
workers, whose loggers and warning filters start afresh (the exporter's "torchvision is not installed" lines and
pickling FutureWarnings once came from there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

QVLC = [sys.executable, "-m", "qvlc"]


def _compile(tmp_path: Path, verbose: bool) -> subprocess.CompletedProcess:
    raw = {"name": f"quiet_{verbose}", "part": "llm",
           "export": {"prefill_len": 64, "max_context": 96, "tp": 2, "workers": 2},
           "validate": {"decode_steps": 2, "generate_tokens": 3}, "output": {"dir": str(tmp_path / "out")}}
    cfg = tmp_path / f"quiet_{verbose}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items()
           if k not in ("QVLC_VERBOSE", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    if verbose:
        env["QVLC_VERBOSE"] = "1"
    return subprocess.run([*QVLC, "compile", str(cfg)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_output_only_when_verbose(tmp_path, verbose):
    proc = _compile(tmp_path, verbose)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if verbose:  # the libraries do speak (so the quiet case below could fail): the workers' exporter logs
        assert "torchvision" in proc.stderr or "Warning" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.stderr == "", proc.stderr[-2000:]
