"""The `qvlc` executable: SIGTERM and SIGINT are blocked before any library is imported (so no thread a library
starts — OpenBLAS's, ONNX Runtime's, torch's — can take a signal the watchdog should see; ``qvlc.system.signals``),
then the command line runs."""

from __future__ import annotations


def main() -> None:
    from qvlc.system.signals import block

    block()
    from qvlc.cli.app import main as cli

    cli()
