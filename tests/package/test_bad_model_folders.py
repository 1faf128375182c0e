"""Bad model folders and odd model arguments: a genai_config.json that is deep, of the wrong shape or with numbers
that are strings, negative or huge is one sentence naming the field (info, run, serve); a 5,000-character
--revision is one sentence; an empty --model-dir or -m is refused instead of fetching the default model."""

import json
import shutil

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError
from phi3v_ort.package import fetch as fetch_module
from phi3v_ort.package.loading import read_package


@pytest.fixture
def folder(tiny_dir, tmp_path):
    target = tmp_path / "pkg"
    shutil.copytree(tiny_dir, target)
    return target


def _edit(folder, change):
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    result = change(config)
    path.write_text(result if isinstance(result, str) else json.dumps(config if result is None else result))


def _set(section, key, value):
    def change(config):
        (config["model"] if section == "model" else config["model"][section])[key] = value
    return change


CASES = {
    "deep": (lambda c: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a number": (lambda c: 5, "no model.decoder object"),
    "a list": (lambda c: [c], "no model.decoder object"),
    "model a string": (lambda c: {"model": "phi3v"}, "no model.decoder object"),
    "vision a list": (_set("model", "vision", [1]), "model.vision must be an object"),
    "context -5": (_set("model", "context_length", -5), "model.context_length must be a whole number"),
    "context 0": (_set("model", "context_length", 0), "model.context_length must be a whole number"),
    "context a string": (_set("model", "context_length", "8192"), "model.context_length must be a whole number"),
    "context 2**40": (_set("model", "context_length", 2**40), "model.context_length must be a whole number"),
    "context a float": (_set("model", "context_length", 8192.5), "model.context_length must be a whole number"),
    "context true": (_set("model", "context_length", True), "model.context_length must be a whole number"),
    "layers huge": (_set("decoder", "num_hidden_layers", 200_000), "model.decoder.num_hidden_layers"),
    "heads a string": (_set("decoder", "num_attention_heads", "32"), "model.decoder.num_attention_heads"),
    "head_size missing": (lambda c: c["model"]["decoder"].pop("head_size") and None, "lacks model.decoder.head_size"),
    "vocab negative": (_set("model", "vocab_size", -1), "model.vocab_size"),
    "eos a string": (_set("model", "eos_token_id", "</s>"), "model.eos_token_id"),
    "filename a number": (_set("vision", "filename", 7), "model.vision.filename"),
    "filename outside": (_set("decoder", "filename", "../../etc/passwd"), "model.decoder.filename"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_genai_config_is_one_sentence_naming_the_field(folder, case):
    change, words = CASES[case]
    _edit(folder, change)
    with pytest.raises(Phi3vError) as info:
        read_package(folder)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["deep", "context -5", "context a string", "context 2**40"])
@pytest.mark.parametrize("command", [["info"], ["run", "hi"], ["serve", "--port", "0"]])
def test_info_run_and_serve_say_it_in_one_line(folder, case, command):
    _edit(folder, CASES[case][0])
    result = CliRunner().invoke(cli, [command[0], "--model-dir", str(folder), *command[1:]])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stderr.startswith("Error: ") and CASES[case][1] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_committed_fixture_still_reads(tiny_dir):
    info = read_package(tiny_dir)
    assert info.context_length > 0 and info.num_layers > 0


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(fetch_module, "fetch", refuse)
    monkeypatch.setattr(fetch_module, "ensure", refuse)


@pytest.mark.parametrize("args,words", [
    (["--model-dir", ""], "--model-dir is empty"), (["--model-dir", "  "], "--model-dir is empty"),
    (["-m", ""], "-m/--model is empty"), (["--model", " "], "-m/--model is empty"),
])
@pytest.mark.parametrize("command", [["info"], ["run", "hi"]])
def test_an_empty_model_option_is_refused_not_the_default(no_hub, args, words, command):
    result = CliRunner().invoke(cli, [command[0], *args, *command[1:]])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {words}")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("revision,words", [("x" * 5000, "1 to 255 characters"), ("", "1 to 255 characters"),
                                            ("../../etc", "is not a branch"), ("a\nb", "is not a branch"),
                                            ("/abs", "is not a branch")])
def test_a_revision_the_cache_cannot_hold_is_one_sentence(revision, words):
    result = CliRunner().invoke(cli, ["fetch", "--revision", revision])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: --revision") and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    fetch_module.check_revision("main")
    fetch_module.check_revision("refs/pr/1")
    fetch_module.check_revision("a" * 40)
