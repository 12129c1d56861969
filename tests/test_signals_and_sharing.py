"""Signals, sharing and self-protection, with real processes where it matters: SIGTERM mid-compile cleans up like a
parity failure, a second compile of the same name is refused at once, published files follow the umask, internal
errors leave a log, and qvlc only deletes folders it marked as its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from qvlc.cli.app import app

QVLC = [sys.executable, "-m", "qvlc"]


def _config(tmp_path: Path, name: str = "slow", long: bool = False, **validate) -> Path:
    """``long``: an ~11 s compile (~4 s otherwise; the staging folder appears after the first ~2 s), so a signal
    sent once the staging folder is seen lands mid-compile even when the test process is starved for seconds on a
    loaded CI runner (a short one once finished first and took the SIGINT during interpreter shutdown: exit -2)."""
    shapes, steps = ((256, 512), (64, 200)) if long else ((64, 96), (4, 8))
    raw = {"name": name, "part": "llm", "export": {"prefill_len": shapes[0], "max_context": shapes[1]},
           "validate": {"decode_steps": steps[0], "generate_tokens": steps[1], **validate},
           "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _default_signals() -> None:
    """A job started in the background (CI runners, nohup) inherits SIGINT ignored, and Python then keeps it
    ignored; give the compile the disposition an interactive shell gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cfg: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*QVLC, "compile", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=_default_signals)


def _wait_for_staging(out: Path, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if out.exists() and any(p.name.startswith(".slow.staging-") for p in out.iterdir()):
            return
        time.sleep(0.05)
    raise AssertionError("the compile never started staging")


def test_sigterm_mid_compile_removes_everything_and_exits_143(tmp_path):
    cfg = _config(tmp_path, long=True)
    proc = _start(cfg)
    _wait_for_staging(tmp_path / "out")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted: SIGTERM" in err and "Traceback" not in err + out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no staging, no lock, no artifact


def test_sigint_mid_compile_exits_130(tmp_path):
    cfg = _config(tmp_path, long=True)
    proc = _start(cfg)
    _wait_for_staging(tmp_path / "out")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: SIGINT" in err and "Traceback" not in err + out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_second_compile_of_the_same_name_is_refused_at_once(tmp_path):
    cfg = _config(tmp_path, long=True)  # still holding the lock when the second one, starting cold, checks
    first = _start(cfg)
    _wait_for_staging(tmp_path / "out")
    t0 = time.time()
    second = subprocess.run([*QVLC, "compile", str(cfg)], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another qvlc compile" in second.stderr
    assert time.time() - t0 < 30  # refused at the check, not after a whole compile
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (tmp_path / "out" / "slow" / "manifest.json").is_file()


def test_published_artifact_follows_the_umask(compiled):
    folder = compiled("umask_llm", validate={"enabled": False}, prefill_len=64, max_context=96).folder
    mask = os.umask(0)
    os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    for p in folder.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p


def test_internal_error_writes_a_log_with_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("QVLC_CACHE", str(tmp_path / "cache"))

    def boom(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("qvlc.compile.stages.export", boom)
    res = CliRunner().invoke(app, ["compile", str(_config(tmp_path, "x", enabled=False))])
    assert res.exit_code == 4 and "Traceback" not in res.output
    logs = list((tmp_path / "cache" / "logs").glob("qvlc-*.log"))
    assert len(logs) == 1 and str(logs[0]) in res.output.replace("\n", "")
    assert "ZeroDivisionError: a bug" in logs[0].read_text() and "Traceback" in logs[0].read_text()


def test_vamc_file_understands_native_validate(tmp_path):
    from qvlc.config.loading import load_config

    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"name": "v", "frontend": {"checkpoint": "tiny"}, "validate": {"enabled": False}}))
    cfg = load_config(path)
    assert cfg.validate.enabled is False and cfg.ignored == ()


def test_markup_in_user_text_is_printed_as_is(tmp_path):
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "a[v2]" / "b[/]" / "[bold]c")])
    assert res.exit_code == 2 and "a[v2]/b[/]/[bold]c" in res.output.replace("\n", "")

