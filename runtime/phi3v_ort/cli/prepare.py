"""`phi3v-ort prepare`: what the model would see, without generating."""

from __future__ import annotations

import json
import os

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import input_options, model_options
from phi3v_ort.errors import Phi3vError


@cli.command(short_help="Show the prompt and token counts the model would get.")
@click.argument("question")
@click.option("-i", "--image", "images", multiple=True, metavar="PATH|URL|-",
              help="An image (repeatable; '-' reads stdin).")
@model_options
@click.option("--system", default=None, help="A system message put before the question.")
@input_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: prompt, input_ids, image_sizes, "
              "num_image_tokens, prompt_tokens.")
@click.option("--save-pixels", type=click.Path(), default=None, metavar="FILE.npy",
              help="Write pixel_values as a .npy file.")
def prepare(question: str, images: tuple[str, ...], model: str | None, model_dir: str | None, device: str,
            system: str | None, crops: int | None, processor: str, as_json: bool, save_pixels: str | None) -> None:
    """Show what the model will see for QUESTION and the images, without generating.

    Counts an image's cost (prompt and image tokens) before a long job; needs only the package's files (with the
    default --processor own).

    \b
    Examples:
      phi3v-ort prepare -i examples/chart.png "Could you please introduce this stock to me?"
      phi3v-ort prepare -i examples/chart.png --crops 4 --json "Describe the chart."
      phi3v-ort prepare -i examples/chart.png --save-pixels pixels.npy "Describe the chart."
    """
    from phi3v_ort.engine.preview import preview, preview_dict
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.package.fetch import resolve_inputs_dir, resolve_model_dir

    if images.count("-") > 1:
        raise Phi3vError("stdin ('-') can be given as an image only once")
    if save_pixels and not save_pixels.endswith(".npy"):
        raise Phi3vError("--save-pixels needs a file name ending in .npy")
    loaded_images = [load_image(src) for src in images]
    # the runtime's pipeline reads only the tokenizer and configs: a catalog model not on disk fetches just those
    folder = (resolve_model_dir if processor == "og" else resolve_inputs_dir)(model, model_dir, device)
    inputs = preview(folder, question, loaded_images, system, processor, crops, device)
    if save_pixels:
        _save_npy(save_pixels, inputs.pixel_values)
    shown = preview_dict(inputs)
    if as_json:
        click.echo(json.dumps(shown, ensure_ascii=False))
        return
    sizes = shown["image_sizes"]
    click.echo("prompt (each image tag stands for that image's tokens)")
    click.echo("".join(f"  {line}\n" for line in inputs.prompt.splitlines()), nl=False)
    click.echo(f"prompt tokens      {inputs.prompt_tokens} (image tokens: "
               f"{', '.join(map(str, inputs.image_tokens)) or 'none'})")
    for img, (h, w) in zip(loaded_images, sizes):
        click.echo(f"image              {img.source}: {img.width}x{img.height} -> {w}x{h} "
                   f"({h // 336 * (w // 336)} crops + the global view)")
    if inputs.pixel_values is not None:
        click.echo(f"pixel_values       {list(inputs.pixel_values.shape)} {inputs.pixel_values.dtype}")
    click.echo(f"processor          {processor}")


def _save_npy(path: str, array) -> None:
    """Write atomically: a failure never leaves a half-written file where another was."""
    import numpy as np

    from phi3v_ort.errors import Phi3vError as _Error

    if array is None:
        raise _Error("there are no pixels to save: give at least one image with -i")
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(target):
        raise _Error(f"cannot write {path}: it is a folder")
    tmp = f"{target}.tmp-{os.getpid()}.npy"
    try:
        np.save(tmp, array)
        os.replace(tmp, target)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise _Error(f"cannot write {path}: {exc.strerror or exc}") from None
