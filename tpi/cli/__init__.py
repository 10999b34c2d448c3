"""The `tpi` command: thin typer commands (one module per family) that hand off to plain functions.

This package is the only one that reads environment variables (through typer's envvar=), and the
only place a TpiError becomes an exit code (tpi.cli.options.reports_errors).
"""
from __future__ import annotations

import logging
from typing import Annotated

import typer

from tpi.cli import chat, devices, group, run
from tpi.cli.options import MODULE_EXTRAS
from tpi.errors import pip_install

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tensor-parallel LLM inference across home devices.")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    setup_logging(verbose)


def setup_logging(verbose: bool = False) -> None:
    """Log lines on stderr, as every tpi command shows them."""
    # imported when the command runs: keeps `tpi --help` fast
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )


for _module in (run, chat, group, devices):
    _module.register(app)


def entry(prog_name: str | None = None) -> None:
    """The `tpi` command: a missing optional module is one error line naming the extra, never a traceback."""
    try:
        app(prog_name=prog_name)
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in MODULE_EXTRAS:
            raise
        typer.echo(f"error: this command needs the '{top}' package, which is not installed here; "
                   f"install it with: {pip_install(MODULE_EXTRAS[top])}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    entry()
