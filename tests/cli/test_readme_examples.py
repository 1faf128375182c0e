"""Every `phi3v-ort` example in the README and in the commands' --help runs as written from the repository root
(issue 23): the README's against the tiny fixture (chosen with $PHI3V_ORT_MODEL, so the command line is the
README's own); --help's name only files that exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-int4-cpu"


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip().startswith("phi3v-ort ")]


def test_the_readme_has_the_notebooks_three_tasks_as_examples():
    examples = readme_examples()
    assert any("examples/chart.png" in e for e in examples)
    assert any("examples/cover.png" in e for e in examples)
    assert any("examples/a.png" in e and "examples/b.png" in e for e in examples)


@pytest.mark.parametrize("command", readme_examples())
def test_a_readme_example_runs_as_written(command):
    env = {**os.environ, "PHI3V_ORT_MODEL": str(FIXTURE), "PHI3V_ORT_SERVER": "off"}
    args = shlex.split(command)
    result = subprocess.run([sys.executable, "-m", "phi3v_ort", *args[1:]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "an answer was printed"
    assert "Traceback" not in result.stderr


def help_examples() -> list[tuple[str, str]]:
    runner = CliRunner()
    found = []
    for name in sorted(cli.commands):
        text = runner.invoke(cli, [name, "--help"], terminal_width=200).output
        examples = text.split("Examples:", 1)[1] if "Examples:" in text else ""
        found += [(name, line.strip()) for line in examples.splitlines() if line.strip().startswith("phi3v-ort ")]
    return found


def test_help_examples_name_only_images_that_exist():
    """Images in --help's examples are the repository's own (examples/, tests/data/), URLs or stdin, so each can
    be run as written from the repository root."""
    missing = []
    for name, line in help_examples():
        words = shlex.split(line.split("  #")[0].replace("\\", ""))
        for flag, value in zip(words, words[1:]):
            if flag in ("-i", "--image") and value != "-" and not value.startswith("http"):
                if not (ROOT / value).is_file():
                    missing.append(f"{name}: {line}")
    assert help_examples(), "the walk found the examples"
    assert not missing, "\n".join(missing)
