"""`phi3v-ort run`: one question about images, the answer streamed."""

from __future__ import annotations

import itertools
import sys
from typing import TYPE_CHECKING

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import (
    guidance_options,
    hands_settings,
    input_options,
    model_options,
    note_cuda_graph,
    open_model,
    sampling_options,
    threads_option,
)
from phi3v_ort.cli.output import finish_answer, prefill_interruptible
from phi3v_ort.cli.served import (
    ServerOptions,
    answered_by_server,
    load_images,
    server_options,
)
from phi3v_ort.errors import Phi3vError

if TYPE_CHECKING:
    from phi3v_ort.engine.settings import GenerationSettings


@cli.command(short_help="Ask a question about images; the answer streams to stdout.")
@click.argument("question")
@click.option("-i", "--image", "images", multiple=True, metavar="PATH|URL|-",
              help="An image to ask about (repeatable; '-' reads stdin).")
@model_options
@sampling_options
@click.option("--system", default=None, help="A system message put before the question.")
@input_options
@threads_option
@click.option("--no-share-buffer", is_flag=True, help="Let the KV cache grow per token instead of one static buffer.")
@click.option("--cuda-graph", is_flag=True, help="Capture CUDA graphs for decoding (CUDA only; ignored, and said "
              "so, on the CPU).")
@click.option("--stats", "show_stats", is_flag=True, help="Print timing and memory stats on stderr after the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming: text, token_ids, "
              "prompt_tokens, num_image_tokens, finish_reason (parsed with a constraint), stats.")
@guidance_options
@server_options
@hands_settings
def run(question: str, images: tuple[str, ...], model: str | None, model_dir: str | None, device: str,
        settings: GenerationSettings, system: str | None, crops: int | None, processor: str, threads: int | None,
        no_share_buffer: bool, cuda_graph: bool, show_stats: bool, as_json: bool, server: ServerOptions) -> None:
    """Ask QUESTION about zero or more images; the answer streams to stdout.

    On a terminal, a phase line on stderr says what is happening until the answer starts (preparing image, reading
    image (N tokens)); nothing of it when stderr is not a terminal. A running `phi3v-ort serve` of the same model
    (folder, device, threads, processor) answers, already loaded, as in-process would (--no-server: never).

    \b
    Examples:
      phi3v-ort run -i examples/chart.png "Could you please introduce this stock to me?"
      phi3v-ort run -i examples/a.png -i examples/b.png "What is difference in this two images?"
      phi3v-ort run -i https://example.com/cover.jpg --stats "Who wrote this book?"
      cat examples/a.png | phi3v-ort run -i - --json "Describe the image."
      phi3v-ort run --model-dir tests/fixtures/tiny-int4-cpu -i tests/data/chart.png --max-new-tokens 32 "Hi"
      phi3v-ort run --keep-alive 10m "Hello"        # later runs answer at once, through the server it started
    """
    from phi3v_ort.engine.kv_cache import KVCachePolicy

    policy = KVCachePolicy(share_buffer=not no_share_buffer, cuda_graph=cuda_graph)
    if images.count("-") > 1:
        raise Phi3vError("stdin ('-') can be given as an image only once")
    loaded_images = load_images(images)
    if answered_by_server(server, question, loaded_images, system, crops, settings, show_stats, as_json, model=model,
                          model_dir=model_dir, device=device, threads=threads, processor=processor, policy=policy):
        return
    from phi3v_ort.cli.phase import Phase, preparing, reading
    from phi3v_ort.engine.generation import Finished, stream_prepared
    from phi3v_ort.engine.generation import prepare as prepare_inputs

    phase = Phase(sys.stderr)  # only when stderr is a terminal
    try:
        loaded = open_model(model, model_dir, device, policy, threads, phase=phase)
        if cuda_graph and loaded.device != "cuda":
            phase.clear()
            note_cuda_graph(cuda_graph, loaded.device)
    except BaseException:
        phase.clear()
        raise

    out = sys.stdout
    finished = None
    try:
        with prefill_interruptible():
            phase.show(preparing(len(loaded_images)))
            prepared = prepare_inputs(loaded, question, loaded_images, system, processor, crops)
            phase.show(reading(prepared.image_tokens, prepared.prompt_tokens))
            events = stream_prepared(loaded, prepared, settings)
            first = next(events)  # the prefill: og holds the GIL until it returns (so the phase line is static)
        phase.clear()  # the first token is here: the answer replaces the phase line
        for event in itertools.chain([first], events):
            if isinstance(event, Finished):
                finished = event
            elif not as_json and event.text:
                out.write(event.text)
                out.flush()
    except KeyboardInterrupt:
        phase.clear()
        if not as_json:
            out.write("\n")
            out.flush()
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    finally:
        phase.clear()

    assert finished is not None
    finish_answer(finished, settings, out, as_json, show_stats)
