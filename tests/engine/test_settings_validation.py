"""GenerationSettings refuses, in one sentence, every value og would refuse later with a traceback.

og 0.18 casts random_seed, top_k and max_length to a C++ int32 (`set_search_options(random_seed=2**31)` raises
"Unable to cast Python instance"; -1 is accepted but means "seed at random"), and takes NaN/inf without a word."""

from __future__ import annotations

import subprocess
import sys

import pytest

from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.settings import GenerationSettings, search_options

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs,needle", [
    ({"seed": -1}, "seed"), ({"seed": 2**31}, "seed"), ({"seed": 2**32 - 1}, "seed"), ({"seed": 2**32}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"top_k": 0}, "top_k"), ({"top_k": 2**31}, "top_k"), ({"top_k": 10**12}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 2**31}, "max_new_tokens"),
    ({"temperature": NAN}, "temperature"), ({"temperature": INF}, "temperature"), ({"temperature": 0}, "temperature"),
    ({"top_p": NAN}, "top_p"), ({"top_p": INF}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"repetition_penalty": NAN}, "repetition_penalty"), ({"repetition_penalty": INF}, "repetition_penalty"),
    ({"repetition_penalty": -INF}, "repetition_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_out_of_range_settings_are_one_sentence(kwargs, needle):
    with pytest.raises(Phi3vError) as info:
        GenerationSettings(do_sample=True, **kwargs)
    message = str(info.value)
    assert message.startswith(needle) and "\n" not in message


@pytest.mark.parametrize("kwargs", [{"seed": 0}, {"seed": 2**31 - 1}, {"top_k": 2**31 - 1},
                                    {"max_new_tokens": 2**31 - 1}, {"temperature": 1e-6, "top_p": 1e-6}])
def test_the_edges_og_takes_pass(kwargs, tiny_model):
    import onnxruntime_genai as og

    settings = GenerationSettings(do_sample=True, **kwargs)
    params = og.GeneratorParams(tiny_model)
    params.set_search_options(**search_options(settings, max_length=64, share_buffer=False))


@pytest.mark.parametrize("args,needle", [(["--seed", str(2**70)], "seed"), (["--top-k", "1000000000000"], "top_k"),
                                         (["--max-new-tokens", str(2**31)], "max_new_tokens")])
def test_the_cli_says_one_line(tiny_dir, args, needle):
    result = subprocess.run([sys.executable, "-m", "phi3v_ort", "run", "--model-dir", str(tiny_dir), *args, "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {needle} must be"), result.stderr
