"""A lone surrogate (what Python makes of a non-UTF-8 byte in argv, or JSON's `\\ud800`: half of an emoji) is one
sentence wherever text becomes tokens: the prompt's text segments, the tokenizer, the CLI's question and system."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.prompt import Text, build_prompt, check_unicode
from phi3v_ort.inputs.tokens import PromptTokenizer

LONE = ["\ud800", "caf\udce9", "look \ud83d", "\udfff end", "a\udc80b"]


@pytest.mark.parametrize("text", LONE)
def test_every_text_path_refuses_a_lone_surrogate(tiny_dir, text):
    for call in (lambda: check_unicode(text, "the question"), lambda: Text(text),
                 lambda: build_prompt(text, 0), lambda: build_prompt("hi", 0, system=text),
                 lambda: PromptTokenizer(tiny_dir).encode_text(text)):
        with pytest.raises(Phi3vError, match="is not valid Unicode: a lone surrogate"):
            call()
    assert PromptTokenizer(tiny_dir).encode_text("caf\u00e9 \U0001F600")  # real characters still work


@pytest.mark.parametrize("args", [["caf\udce9"], ["--system", "\udcff", "hi"], ["--processor", "og", "\ud800"]])
def test_run_says_it_in_one_line(tiny_dir, args):
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "--max-new-tokens", "2", *args])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: the text is not valid Unicode: a lone surrogate")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_non_utf8_byte_on_the_real_command_line(tiny_dir):
    result = subprocess.run([sys.executable, "-m", "phi3v_ort", "run", "--model-dir", str(tiny_dir),
                             "--max-new-tokens", "2", b"caf\xe9"], capture_output=True, timeout=120)
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.startswith(b"Error: the text is not valid Unicode") and b"Traceback" not in result.stderr
