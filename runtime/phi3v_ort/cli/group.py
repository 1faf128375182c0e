"""The `phi3v-ort` click group: every expected failure becomes one `Error:` line, never a traceback."""

from __future__ import annotations

import click

from phi3v_ort import __version__
from phi3v_ort.errors import Phi3vError


class Phi3vCommand(click.Command):
    """A command that turns an expected failure into `Error: <one sentence>` on its own too (scripts/fetch_model.py
    runs `fetch` outside the group, under the script's name)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Phi3vError as exc:
            raise click.ClickException(str(exc)) from None


class Phi3vGroup(click.Group):
    """Turns every expected failure into `Error: <one sentence>` and a non-zero exit, never a traceback; a bad
    option value too (click would print the usage block around it)."""

    command_class = Phi3vCommand

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Phi3vError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            if exc.ctx is not None and exc.ctx.command is not self and "--help" not in (exc.ctx.args or []):
                raise click.ClickException(exc.format_message()) from None
            raise


@click.group(cls=Phi3vGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi3v-ort")
def cli() -> None:
    """Run Phi-3-vision locally on ONNX Runtime GenAI: ask about images, chat, batch, serve.

    Without --model-dir or -m, commands use $PHI3V_ORT_MODEL or phi-3-vision, fetched from the Hugging Face hub on
    first use (the GPU int4 build with an NVIDIA GPU, the CPU int4 build otherwise; `phi3v-ort models` shows what
    is on disk).

    \b
    Examples:
      phi3v-ort run -i examples/chart.png "Could you please introduce this stock to me?"
      phi3v-ort chat -i examples/cover.png
      phi3v-ort serve --port 8000        # then open http://127.0.0.1:8000/
      phi3v-ort COMMAND --help           # a command's options and examples
    Shell completion (bash): eval "$(_PHI3V_ORT_COMPLETE=bash_source phi3v-ort)"
    """


def main() -> None:
    cli()  # click itself turns a Ctrl-C outside the generation loops into "Aborted!" (exit 1), no traceback
