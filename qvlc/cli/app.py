"""The `qvlc` command line: one typer app, one module per command. It parses, prints and decides exit codes; no
compiler work happens here (pip's ``_internal/cli`` over its library, in small).

Exit codes (``qvlc.errors``): 0 success · 1 parity or integrity failure · 2 bad input · 3 environment (disk full,
read-only, permission) · 4 internal error (traceback in a log file) · 130/143 interrupted by SIGINT/SIGTERM.
User text (paths, values, prompts) is never read as rich markup.
"""

from __future__ import annotations

import typer

from qvlc.cli.compile import compile
from qvlc.cli.eval import eval_
from qvlc.cli.run import run
from qvlc.cli.serve import serve
from qvlc.cli.validate import validate
from qvlc.cli.verify import verify
from qvlc.cli.version import version

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile Qwen2-VL-family checkpoints into statically shaped ONNX artifacts, proven against "
                       "PyTorch.")
for command in (compile, validate, verify, run, serve, version):
    app.command()(command)
app.command("eval")(eval_)


def main() -> None:
    app()
