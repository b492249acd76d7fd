"""The ``vlm-lens`` command line: one typer app.

``vlm-lens analyze`` (no arguments: the embedded model with a planted prior, on bundled and counter-prior questions),
``skip``, ``tune-lens``, ``validate``, ``hooks``, ``demo``, and ``vlm-lens zoo train | plant | evaluate``
(:mod:`vlm_lens.experiments.cli.zoo`). Exit codes: 0 success, 1 a failed run, 2 bad input (one line naming the fix).
Cheap checks (paths, ranges, option combinations) run before any model is loaded.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from vlm_lens.experiments.cli import analyze, decode, flow, lens, tools
from vlm_lens.experiments.cli.common import fail
from vlm_lens.experiments.cli.zoo import zoo_app

_DEBUG = {"on": bool(os.environ.get("VLM_LENS_DEBUG"))}
# typer ships its own copy of click: its usage errors (BadParameter, NoSuchOption, unknown commands ...) derive from
# that copy's ClickException, not the standalone package's. Found through a public name, not typer's private module.
_TYPER_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _ErrorsToExitCodes(TyperGroup):
    """Bad input (:class:`~vlm_lens.errors.VLMLensError`) -> exit 2 and one line naming the fix; any other failure ->
    exit 1 and one line; ``--debug`` (or ``VLM_LENS_DEBUG=1``) lets the traceback through instead."""

    def invoke(self, ctx):
        import click

        from vlm_lens.errors import VLMLensError

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, typer.Exit, typer.Abort,
                _TYPER_CLICK_EXCEPTION):  # fmt: skip
            _attach_usage(self, ctx, sys.exc_info()[1])
            raise  # usage errors: click prints the usage line and "Error: ..." and exits 2
        except VLMLensError as error:
            if _DEBUG["on"]:
                raise
            fail(str(error), 2)
        except KeyboardInterrupt:
            fail("interrupted; nothing half-written was left behind (rerun, with --resume for analyze)", 130)
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if _DEBUG["on"]:
                raise
            fail(f"the run failed: {type(error).__name__}: {error} (rerun with --debug for the traceback)", 1)


def _attach_usage(group, ctx, error) -> None:
    """An option missing its value fails while the command's context is being made, so click has no context to print
    the usage line from: give it the command's (parsed leniently, so it cannot fail itself)."""
    name = getattr(ctx, "invoked_subcommand", None)  # set by click before it makes the command's context
    if getattr(error, "ctx", True) is not None or not name:
        return
    command = group.get_command(ctx, name)
    if command is not None:
        error.ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_ErrorsToExitCodes, rich_markup_mode=None,
                  help="How knowledge evolves inside vision-language models.")  # fmt: skip


def _version(value: bool) -> None:
    if value:
        import vlm_lens

        typer.echo(f"vlm-lens {vlm_lens.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
          debug: bool = typer.Option(False, "--debug", help="show Python tracebacks instead of one-line errors")):
    """How knowledge evolves inside vision-language models."""
    _DEBUG["on"] = debug or bool(os.environ.get("VLM_LENS_DEBUG"))  # per invocation: one --debug run does not stick


# every command, in the order ``--help`` lists them
for command in (tools.skip, tools.hooks, tools.demo, analyze.analyze, analyze.report):
    app.command()(command)
app.command("tune-lens")(lens.tune_lens)
app.command()(lens.validate)
app.command()(flow.flow)
app.command()(decode.decode)
app.add_typer(zoo_app, name="zoo")


def main() -> None:  # pragma: no cover
    app()
