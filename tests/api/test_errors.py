"""Each error class a caller branches on, raised where the problem is found, with the CLI's one sentence."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

import phi3v_ort
from phi3v_ort.cli import cli
from phi3v_ort.engine.guidance import GuidanceError


def test_the_classes_are_one_family():
    for cls in (phi3v_ort.ContextTooLong, phi3v_ort.ImageError, phi3v_ort.SettingError, phi3v_ort.ConstraintError):
        assert issubclass(cls, phi3v_ort.Phi3vError)
    assert issubclass(GuidanceError, phi3v_ort.ConstraintError)
    from phi3v_ort.engine.conversation import ContextTooLong  # still importable where it was

    assert ContextTooLong is phi3v_ort.ContextTooLong


def test_context_too_long(model):
    with pytest.raises(phi3v_ort.ContextTooLong, match="the prompt is .* tokens .* context is 8192") as info:
        model.ask("hello " * 9000, max_new_tokens=4)
    assert info.value.allowed == 8192 and info.value.requested > 8192
    chat = model.chat()
    with pytest.raises(phi3v_ort.ContextTooLong, match="this turn alone needs"):
        chat.ask("hello " * 9000, max_new_tokens=4)
    assert chat.history == []  # refused before anything changed


@pytest.mark.parametrize("image,message", [
    ("no/such/file.png", "image file not found: no/such/file.png"),
    (b"not an image", "images[0] is not an image Pillow can read"),
    (b"", "image images[0] is empty"),
    (np.zeros((4, 4), dtype=np.uint8), r"images\[0\] must be an HxWx3 uint8 array \(RGB\), got shape \(4, 4\) uint8"),
    (np.zeros((4, 4, 3), dtype=np.float32), "must be an HxWx3 uint8 array"),
    (3.5, "images[0] is of type float: give a path, a PIL image, bytes or an HxWx3 uint8 array"),
    ("https://example.com/cover.png", "is a URL: pass allow_remote=True"),
])
def test_a_bad_image_is_an_image_error(model, image, message):
    with pytest.raises(phi3v_ort.ImageError) as info:
        model.ask("What is this?", images=[image])
    assert message in str(info.value) or re.search(message, str(info.value)), str(info.value)
    with pytest.raises(phi3v_ort.ImageError):
        model.prepare("What is this?", images=[image])


@pytest.mark.parametrize("settings,cli_args", [
    ({"max_new_tokens": 2**31}, ["--max-new-tokens", str(2**31)]),
    ({"max_new_tokens": 0}, ["--max-new-tokens", "0"]),
    ({"temperature": 0}, ["--temperature", "0"]),
    ({"top_p": 1.5}, ["--top-p", "1.5"]),
    ({"top_k": 0}, ["--top-k", "0"]),
    ({"seed": 2**40, "temperature": 0.5}, ["--seed", str(2**40), "--temperature", "0.5"]),
])
def test_a_bad_setting_says_what_the_cli_says(model, tiny_dir, settings, cli_args):
    with pytest.raises(phi3v_ort.SettingError) as info:
        model.ask("Hi", **settings)
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), *cli_args, "Hi"])
    assert result.exit_code == 1 and result.stderr == f"Error: {info.value}\n"


@pytest.mark.parametrize("settings,message", [
    ({"max_tokens": 5}, "unknown setting 'max_tokens': choose from max_new_tokens, temperature"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer, got '5'"),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"crops": 0}, "the crop budget must be 1 to 16, got 0"),
    ({"crops": 2.5}, "crops must be an integer, got 2.5"),
    ({"json_object": "yes"}, "json_object must be True or False, got 'yes'"),
    ({"stop": ["a", ""]}, "stop must be a non-empty string or a list of at most 4 non-empty strings"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop must be a non-empty string or a list of at most 4"),
])
def test_more_bad_settings(model, settings, message):
    with pytest.raises(phi3v_ort.SettingError, match="^" + re.escape(message)):
        model.ask("Hi", **settings)
    with pytest.raises(phi3v_ort.SettingError):
        model.chat().ask("Hi", **settings)


def test_bad_load_options_are_setting_errors(tiny_dir):
    with pytest.raises(phi3v_ort.SettingError, match="the crop budget must be 1 to 16, got 17"):
        phi3v_ort.load(tiny_dir, device="cpu", crops=17)
    with pytest.raises(phi3v_ort.SettingError, match="unknown processor 'hf': choose own or og"):
        phi3v_ort.load(tiny_dir, device="cpu", processor="hf")
    with pytest.raises(phi3v_ort.SettingError, match="og's processor always uses 16 crops"):
        phi3v_ort.load(tiny_dir, device="cpu", processor="og", crops=4)
    with pytest.raises(phi3v_ort.Phi3vError, match="unknown device 'tpu'"):
        phi3v_ort.load(tiny_dir, device="tpu")


@pytest.mark.parametrize("settings,message", [
    ({"regex": "("}, "regex cannot be compiled:"),
    ({"grammar": "start: undefined_rule\n"}, "grammar cannot be compiled:"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema must be a JSON object, got a list"),
    ({"json_schema": {"type": "object"}, "regex": "a"}, "json_schema and regex cannot be combined"),
])
def test_a_bad_constraint_is_a_constraint_error(model, settings, message):
    with pytest.raises(phi3v_ort.ConstraintError, match="^" + re.escape(message)):
        model.ask("Hi", max_new_tokens=4, **settings)


def test_the_question_must_be_text(model):
    with pytest.raises(phi3v_ort.Phi3vError, match="the question must be a string, got bytes"):
        model.ask(b"Hi")
