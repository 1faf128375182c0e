"""`phi3v-ort chat`: the interactive chat (the loop itself: chat_loop.py)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import (
    guidance_options,
    hands_settings,
    input_options,
    model_options,
    open_model,
    sampling_options,
    threads_option,
)
from phi3v_ort.cli.output import format_stats
from phi3v_ort.cli.served import ServerOptions, pick_server, server_options
from phi3v_ort.engine.kv_cache import CONVERSATION_RESERVE_TOKENS

if TYPE_CHECKING:
    from phi3v_ort.engine.settings import GenerationSettings


@cli.command(short_help="Chat about images, keeping the KV cache between turns.")
@click.option("-i", "--image", "images", multiple=True, metavar="PATH|URL",
              help="An image for the first question (repeatable); later ones with /image.")
@model_options
@sampling_options
@click.option("--system", default=None, help="A system message for the whole conversation.")
@input_options
@threads_option
@click.option("--reserve-tokens", type=int, default=CONVERSATION_RESERVE_TOKENS, show_default=True,
              help="KV-cache room kept for follow-up turns beyond the first answer.")
@guidance_options
@server_options
@hands_settings
def chat(images: tuple[str, ...], model: str | None, model_dir: str | None, device: str,
         settings: GenerationSettings, system: str | None, crops: int | None, processor: str,
         threads: int | None, reserve_tokens: int, server: ServerOptions) -> None:
    """An interactive chat about images that keeps the KV cache between turns.

    Type a question per line; /help lists the commands (/image PATH, /detach, /reset, /stats, /format, /save FILE).
    Ctrl-C stops an answer, Ctrl-D leaves. When stdin is not a terminal, each line is a turn.

    \b
    Examples:
      phi3v-ort chat -i examples/chart.png
      phi3v-ort chat --system "Answer in one sentence." -i examples/cover.png
      printf 'What is this?\\nAnd the title?\\n' | phi3v-ort chat -i examples/cover.png
    """
    from phi3v_ort.cli.chat_loop import run_chat, stdin_is_terminal
    from phi3v_ort.cli.phase import Phase
    from phi3v_ort.engine.conversation import Conversation
    from phi3v_ort.inputs.images import load_image

    loaded_images = [load_image(src) for src in images]
    phase = Phase(sys.stderr)  # only when stderr is a terminal
    client = pick_server(server, model, model_dir, device, threads, processor, settings, loaded_images)
    if client is not None:  # a running server answers (it keeps the KV cache between turns itself)
        from phi3v_ort.client.chat import ServedConversation

        conversation = ServedConversation(client, settings, system, processor, crops)
    else:
        try:
            loaded = open_model(model, model_dir, device, threads=threads, phase=phase)
        finally:
            phase.clear()
        conversation = Conversation(loaded, settings, system, reserve_tokens, processor=processor, crops=crops)
    sys.exit(run_chat(conversation, loaded_images, sys.stdin, sys.stdout, sys.stderr,
                      interactive=stdin_is_terminal(), format_stats=format_stats, phase=phase))
