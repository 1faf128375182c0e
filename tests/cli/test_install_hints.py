"""Every message that asks for an optional extra says it one way, valid for phi3v-ort installed from a clone, a
built wheel or an index alike: pip install 'phi3v-ort[EXTRA]' (issue 23)."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli


@pytest.mark.parametrize("command, module, extra", [
    (["export", "--checkpoint", "ckpt", "--out", "out"], "phi3v_ort.export.exporter", "build"),
    (["serve", "--port", "0"], "phi3v_ort.server.app", "serve"),
])
def test_a_missing_extra_names_the_one_install_command(monkeypatch, command, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError, as without the extra
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.endswith(f"extra ({module} is missing): pip install 'phi3v-ort[{extra}]'")


def test_no_help_or_message_suggests_a_clone_only_install():
    import pathlib

    runtime = pathlib.Path(__file__).resolve().parents[2] / "runtime" / "phi3v_ort"
    offenders = [f"{p.relative_to(runtime)}: {line.strip()}" for p in runtime.rglob("*.py")
                 for line in p.read_text().splitlines() if "pip install" in line and "'.[" in line]  # '.[build]' installs from a clone only
    assert not offenders, "\n".join(offenders)
