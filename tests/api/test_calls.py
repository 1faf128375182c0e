"""`import phi3v_ort`: load, ask, stream, chat, prepare, close, on the tiny fixture (random weights: the answers are
gibberish, the mechanics are real)."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import pytest
from click.testing import CliRunner

import phi3v_ort
from phi3v_ort.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_public_names_are_exported():
    assert set(phi3v_ort.__all__) >= {"load", "Model", "Chat", "Answer", "Phi3vError", "ContextTooLong", "ImageError",
                                      "SettingError", "ConstraintError"}
    for name in phi3v_ort.__all__:
        assert hasattr(phi3v_ort, name), name


def test_the_package_is_marked_typed():
    assert (ROOT / "runtime" / "phi3v_ort" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def test_help_of_load_is_readable():
    text = pydoc.render_doc(phi3v_ort.load, renderer=pydoc.plaintext)
    assert "load(model: 'str | os.PathLike[str]' = 'phi-3-vision', device: 'str' = 'auto'" in text
    assert "a catalog name" in text and ">>> model = phi3v_ort.load(" in text
    for name in ("Model.ask", "Model.stream", "Model.chat", "Model.prepare", "Chat.ask", "Chat.stream"):
        owner, method = name.split(".")
        doc = getattr(getattr(phi3v_ort, owner), method).__doc__
        assert doc and ">>>" in doc, name  # a short example each


def test_ask_returns_the_answer_and_its_counts(model, chart):
    answer = model.ask("Could you please introduce this stock to me?", images=[chart], max_new_tokens=6)
    assert isinstance(answer, phi3v_ort.Answer)
    assert len(answer.token_ids) == answer.stats.generated_tokens == 6 and answer.finish_reason == "length"
    assert answer.text and str(answer) == answer.text
    assert answer.num_image_tokens == answer.stats.image_tokens and len(answer.num_image_tokens) == 1
    assert answer.prompt_tokens == answer.stats.prompt_tokens > answer.num_image_tokens[0]
    assert answer.parsed is None and answer.problem is None and answer.notices == ()


def test_stream_yields_the_pieces_of_the_same_answer(model, chart):
    whole = model.ask("Describe the image.", images=[chart], max_new_tokens=8)
    stream = model.stream("Describe the image.", images=[chart], max_new_tokens=8)
    pieces = list(stream)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == whole.text and stream.answer.token_ids == whole.token_ids


def test_a_stream_left_early_stops_generating(model):
    stream = model.stream("Hello", max_new_tokens=50)
    first = next(stream)
    stream.close()
    assert first
    with pytest.raises(phi3v_ort.Phi3vError, match="stopped before it ended"):
        stream.answer


def test_answer_of_a_stream_reads_the_rest(model):
    stream = model.stream("Hello", max_new_tokens=7)
    next(stream)
    assert len(stream.answer.token_ids) == 7


def test_chat_keeps_the_kv_cache_between_turns(model, chart):
    chat = model.chat(system="Answer briefly.")
    first = chat.ask("What is in this picture?", images=[chart], max_new_tokens=5)
    second = chat.ask("And the colours?", max_new_tokens=5)
    assert first.stats.kv_reused is False and second.stats.kv_reused is True
    assert second.stats.prompt_tokens < 30  # only the new turn was prefilled
    assert second.prompt_tokens > first.prompt_tokens + first.stats.generated_tokens  # the whole conversation
    assert second.num_image_tokens == () and first.num_image_tokens == first.stats.image_tokens
    assert chat.history == [("What is in this picture?", first.text), ("And the colours?", second.text)]
    third = chat.ask("Another one?", images=[chart], max_new_tokens=3)  # a new image: a fresh prefill, said so
    assert third.stats.kv_reused is False and any("re-prefilling" in n for n in third.notices)
    chat.reset()
    assert chat.history == []


def test_chat_stream(model):
    chat = model.chat()
    pieces = list(chat.stream("Hello there", max_new_tokens=6))
    assert "".join(pieces) == chat.history[0][1] and len(pieces) > 1


def test_prepare_is_what_prepare_json_prints(model, chart, tiny_dir):
    prepared = model.prepare("Describe.", images=[chart], crops=4)
    result = CliRunner().invoke(cli, ["prepare", "--model-dir", str(tiny_dir), "-i", str(chart), "--crops", "4",
                                      "--json", "Describe."])
    assert result.exit_code == 0, result.stderr
    assert prepared == json.loads(result.stdout)
    assert set(prepared) == {"prompt", "input_ids", "image_sizes", "num_image_tokens", "prompt_tokens"}


def test_load_by_path_object_and_context_manager(tiny_dir):
    with phi3v_ort.load(Path(tiny_dir), device="cpu", threads=1, crops=4) as model:
        assert model.device == "cpu" and model.path == Path(tiny_dir).resolve() and model.crops == 4
        chat = model.chat()
        answer = model.ask("Hi", images=[ROOT / "examples" / "a.png"], max_new_tokens=2)
    assert "closed" in repr(model)
    with pytest.raises(phi3v_ort.Phi3vError, match="the model is closed"):
        model.ask("Hi")
    with pytest.raises(phi3v_ort.Phi3vError, match="the model is closed"):
        chat.ask("Hi")
    assert len(answer.token_ids) == 2


def test_load_takes_a_folder_name_as_the_cli_does(tiny_dir):
    model = phi3v_ort.load(str(tiny_dir), device="cpu")
    assert model.ask("Hi", max_new_tokens=1).token_ids
    model.close()
    model.close()  # twice is fine


@pytest.mark.parametrize("module", ["phi3v_ort.api", "phi3v_ort.engine.settings", "phi3v_ort.engine.stop",
                                    "phi3v_ort.inputs.images"])
def test_the_docstring_examples_run(module, monkeypatch):
    import doctest
    import importlib

    monkeypatch.chdir(ROOT)  # the examples name files from the repository root, as the README does
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_a_catalog_name_is_fetched_on_first_use_like_run(tiny_dir, tmp_path, monkeypatch, capfd):
    from phi3v_ort.package.catalog import PHI3
    from tests.package.fake_hub import FakeHub

    with FakeHub() as hub:
        hub.add_repo_from_dir(PHI3, "cpu/cpu-int4-rtn-block-32-acc-level-4", tiny_dir)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with phi3v_ort.load("phi-3-vision", device="cpu") as model:
            fetched = model.ask("Hi", max_new_tokens=4)
            assert str(tmp_path / "hub-cache") in str(model.path)
        assert "Fetching phi-3-vision:cpu-int4" in capfd.readouterr().err
    with phi3v_ort.load(tiny_dir, device="cpu") as model:
        assert model.ask("Hi", max_new_tokens=4).token_ids == fetched.token_ids
