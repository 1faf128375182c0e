"""Extreme aspect ratios: the HD resize makes the short side int(336 * scale / ratio) pixels, 0 past
336 * num_crops : 1. The reference processor fails there (a resize to a zero size), og's processor too; the runtime
refuses in one sentence naming the image, on both pipelines and through the CLI, and takes everything up to it."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.images import load_image
from phi3v_ort.inputs.pipeline import make_pipeline
from phi3v_ort.package import contract
from phi3v_ort.package.loading import open_inputs, read_package

TOO_NARROW = [(6000, 1, 16), (1, 6000, 16), (400, 1, 1), (1, 400, 1), (16385, 4, 1), (5377, 1, 16), (674, 1, 2),
              (1, 3361, 10), (89478485, 1, 16)]
JUST_FITS = [(5376, 1, 16), (1, 5376, 16), (336, 1, 1), (672, 1, 2), (1344, 4, 1), (3360, 1, 10)]


def _image(tmp_path, w, h):
    path = tmp_path / f"strip_{w}x{h}.png"
    Image.new("RGB", (w, h), (30, 60, 90)).save(path)
    return load_image(str(path))


@pytest.fixture(scope="module")
def builder(tiny_dir):
    return open_inputs(read_package(tiny_dir))


@pytest.mark.parametrize("w,h,crops", TOO_NARROW)
def test_a_shape_the_resize_flattens_is_one_sentence_naming_it(w, h, crops):
    with pytest.raises(Phi3vError) as info:
        contract.check_hd_shape(w, h, crops, "strip.png")
    message = str(info.value)
    assert message.startswith(f"the model cannot take image strip.png: it is {w}x{h} pixels, too narrow")
    assert f"{336 * crops:,} times" in message
    with pytest.raises(ValueError):  # the formula itself never returns a zero size
        contract.hd_scale(w, h, crops)


@pytest.mark.parametrize("w,h,crops", JUST_FITS)
def test_every_shape_up_to_the_limit_is_prepared(builder, tmp_path, w, h, crops):
    contract.check_hd_shape(w, h, crops, "strip.png")
    prepared = make_pipeline(builder, "own", crops).prepare_image(_image(tmp_path, w, h))
    assert min(prepared.size) == 336 and prepared.tokens == contract.image_tokens_for(w, h, crops)
    assert np.isfinite(prepared.crops).all()


@pytest.mark.parametrize("w,h,crops", [s for s in TOO_NARROW if s[0] * s[1] < 10**6])
def test_the_own_pipeline_refuses_them(builder, tmp_path, w, h, crops):
    with pytest.raises(Phi3vError, match=f"the model cannot take image {tmp_path}.*: it is {w}x{h} pixels, too narrow"):
        make_pipeline(builder, "own", crops).prepare_image(_image(tmp_path, w, h))


@pytest.mark.parametrize("w,h,words", [(6000, 1, "too narrow"), (1, 5377, "too narrow"),
                                       (16385, 4, "og's image decoder reads at most 16384"),
                                       (4, 20000, "og's image decoder reads at most 16384")])
def test_og_pipeline_refuses_what_og_cannot_take(builder, tmp_path, w, h, words):
    with pytest.raises(Phi3vError, match=words):
        make_pipeline(builder, "og").prepare_image(_image(tmp_path, w, h))
    make_pipeline(builder, "own").prepare_image(_image(tmp_path, 5376, 2))  # the own pipeline takes wide PNGs


@pytest.mark.parametrize("extra", [[], ["--crops", "1"], ["--processor", "og"]])
def test_run_says_it_in_one_line(tiny_dir, tmp_path, extra):
    path = tmp_path / "strip.png"
    Image.new("RGB", (6000, 1), (0, 0, 0)).save(path)
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), *extra, "-i", str(path), "hi"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"Error: the model cannot take image {path}: it is 6000x1 pixels, too narrow")
    assert len(result.stderr.strip().splitlines()) == 1
