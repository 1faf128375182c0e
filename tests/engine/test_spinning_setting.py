"""Intra-op spinning: off by default (engine/model.py has the measurements), on with PHI3V_ORT_SPINNING=1 for a
machine that runs nothing else; a bad value is one sentence before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli
from phi3v_ort.engine import model as engine_model
from phi3v_ort.errors import SettingError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-int4-cpu"


@pytest.mark.parametrize("value,expected", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_the_environment_chooses_spinning(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(engine_model.SPINNING_ENV, raising=False)
    else:
        monkeypatch.setenv(engine_model.SPINNING_ENV, value)
    assert engine_model.default_spinning() is expected
    overlay = json.loads(engine_model.thread_overlay(2, engine_model.default_spinning()))
    for component in ("decoder", "embedding", "vision"):
        options = overlay["model"][component]["session_options"]
        assert options["session.intra_op.allow_spinning"] == ("1" if expected else "0")
        assert options["intra_op_num_threads"] == 2


def test_a_bad_value_is_one_sentence(monkeypatch):
    monkeypatch.setenv(engine_model.SPINNING_ENV, "yes")
    with pytest.raises(SettingError, match="PHI3V_ORT_SPINNING must be 1"):
        engine_model.default_spinning()
    monkeypatch.setenv("PHI3V_ORT_SERVER", "off")
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(FIXTURE), "--max-new-tokens", "2", "Hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == ["Error: $PHI3V_ORT_SPINNING must be 1 (spin) or 0 (do not), got 'yes'"]


def test_a_model_loads_with_spinning_on(monkeypatch):
    monkeypatch.setenv(engine_model.SPINNING_ENV, "1")
    loaded = engine_model.load_model(FIXTURE, device="cpu", threads=1)
    assert loaded.threads == 1
