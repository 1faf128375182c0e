"""A new user's first ten minutes (issue 15): the README's commands, help that teaches, honest exit codes, a
diagnostic that never downloads, one name per fact in `run --json`, a phase line only on a terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "tests" / "data" / "chart.png"
QUESTION = "Could you please introduce this stock to me?"


# -- the README's two commands and CI ----------------------------------------------------------------------------

def _readme_blocks() -> dict[str, list[str]]:
    """The README's first three bash blocks, by their comment line: install, the main job, the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[:3]
    return {block.splitlines()[0]: [line for line in block.splitlines() if line and not line.startswith("#")]
            for block in blocks}


def test_readme_opens_with_install_main_job_and_tests_one_command_a_line_and_ci_runs_the_tests():
    readme = (ROOT / "README.md").read_text()
    install, main_job, tests = _readme_blocks().values()
    assert install == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -e ."]  # the runtime alone
    assert len(main_job) == 1 and main_job[0].startswith(
        "phi3v-ort run --model-dir tests/fixtures/tiny-int4-cpu -i examples/chart.png")
    assert tests == [". .venv/bin/activate", "pip install torch==2.13.0 -e '.[test,build]'", "python -m pytest -q"]
    assert all(len(line) <= 120 for line in install + main_job + tests)
    # the first screen: three blocks, then what it is (og named once, in words), no internals
    first_screen = readme[:readme.index("\n## ")]
    assert "ONNX Runtime GenAI" in first_screen and "GIL" not in first_screen and "conftest" not in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run reads the test block from the README and runs it in a copy of the tree with a venv made anew
    # there: the user's own .venv is never removed (issue 23)
    assert "rm -rf .venv" not in ci and 'rm -rf "$work"' in ci and "work=.ci/checkout" in ci
    assert ci.index('cd "$work"') < ci.index("python3 -m venv .venv")
    assert ".ci/checkout/" in (ROOT / ".gitignore").read_text().splitlines()
    awk = ci[ci.index("test_command=$(awk '") + len("test_command=$(awk '"):ci.index("' README.md)")]
    got = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert got == " && ".join(tests)
    assert '-eq 5' in ci  # pytest's "no tests collected" fails CI


# -- help -------------------------------------------------------------------------------------------------------

def _commands():
    return sorted(cli.commands.items())


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_a_summary_examples_and_help_on_every_option(name):
    command = cli.commands[name]
    summary = command.get_short_help_str(limit=70)
    assert summary and not summary.endswith("...") and len(summary) <= 70, summary
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts} has no help text"
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output
    examples = result.output.split("Examples:", 1)[1].split("\nOptions:", 1)[0]
    assert f"phi3v-ort {name}" in examples
    # the \b block keeps one example per line (click would otherwise rewrap them into one paragraph)
    assert len(re.findall(r"^    \S", examples, re.M)) >= 2, examples


def test_group_help_lists_one_line_summaries_and_completion():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in cli.commands:
        line = next(line for line in result.output.splitlines() if line.strip().startswith(name + " "))
        assert not line.endswith("..."), line
    assert "_PHI3V_ORT_COMPLETE=bash_source phi3v-ort" in result.output
    readme = (ROOT / "README.md").read_text()
    assert "_PHI3V_ORT_COMPLETE=bash_source phi3v-ort" in readme and '-m "not build"' in readme


def test_bench_help_lists_its_scenarios():
    from phi3v_ort.bench.scenarios import SCENARIOS

    output = " ".join(CliRunner().invoke(cli, ["bench", "--help"]).output.split())
    assert "from: " + ", ".join(SCENARIOS) in output


def test_batch_help_names_the_output_option():
    output = CliRunner().invoke(cli, ["batch", "--help"]).output
    assert "-o OUTPUT" in output and "into OUTPUT" not in output


def test_fetch_script_help_is_its_own():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_model.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: fetch_model.py [OPTIONS]") and "fetch_model.py fetch" not in proc.stdout
    assert "--variant" in proc.stdout


def test_fetch_script_errors_are_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_model.py"), "-m", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: unknown model 'nope'")
    assert "Traceback" not in proc.stderr


def test_cuda_graph_on_the_cpu_says_it_is_ignored(tiny_dir):
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "--device", "cpu", "--cuda-graph",
                                      "--max-new-tokens", "2", "Hi"])
    assert result.exit_code == 0, result.stderr
    assert "--cuda-graph is ignored" in result.stderr and "CPU" in result.stderr
    assert "ignored" not in result.stdout


# -- run --json: one name per fact --------------------------------------------------------------------------------

def test_run_json_names_each_fact_once(tiny_dir):
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "--json", "--max-new-tokens", "3",
                                      "-i", str(CHART), QUESTION])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"text", "token_ids", "prompt_tokens", "num_image_tokens", "finish_reason", "stats"}
    assert out["num_image_tokens"] == [1921] and out["finish_reason"] == "length"
    assert not {"prompt_tokens", "image_tokens", "num_image_tokens", "finish_reason"} & set(out["stats"])
    assert out["stats"]["generated_tokens"] == len(out["token_ids"]) == 3
    shown = json.loads(CliRunner().invoke(cli, ["prepare", "--model-dir", str(tiny_dir), "--json", "-i", str(CHART),
                                                QUESTION]).stdout)
    assert (shown["prompt_tokens"], shown["num_image_tokens"]) == (out["prompt_tokens"], out["num_image_tokens"])


# -- info never downloads ----------------------------------------------------------------------------------------

def test_info_without_a_model_dir_reports_and_never_downloads(tmp_path, monkeypatch):
    import phi3v_ort.package.fetch as fetch

    def no_network(*args, **kwargs):
        raise AssertionError("info tried to download")

    monkeypatch.setattr(fetch, "fetch", no_network)
    monkeypatch.setattr(fetch, "ensure", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing there: a request would fail, not hang
    monkeypatch.delenv("PHI3V_ORT_MODEL", raising=False)
    result = CliRunner().invoke(cli, ["info", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "phi-3-vision:cpu-int4" in result.stdout and "not on this machine" in result.stdout
    assert "microsoft/Phi-3-vision-128k-instruct-onnx/cpu/cpu-int4-rtn-block-32-acc-level-4" in result.stdout
    assert str(tmp_path / "hub") in result.stdout and "phi3v-ort fetch" in result.stdout
    assert not (tmp_path / "hub").exists()
    # a model on disk is loaded and described, still without the network
    result = CliRunner().invoke(cli, ["info", "-m", str(ROOT / "tests" / "fixtures" / "tiny-int4-cpu")])
    assert result.exit_code == 0, result.output
    assert "model type" in result.stdout and "decoder          2 layers" in result.stdout


def test_info_on_an_incomplete_copy_says_what_is_wrong(tmp_path, monkeypatch):
    import phi3v_ort.package.fetch as fetch

    monkeypatch.setattr(fetch, "fetch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("download")))
    hub = tmp_path / "hub"
    snapshot = hub / "models--microsoft--Phi-3-vision-128k-instruct-onnx" / "snapshots" / "abc"
    (snapshot / "cpu" / "cpu-int4-rtn-block-32-acc-level-4").mkdir(parents=True)
    (hub / "models--microsoft--Phi-3-vision-128k-instruct-onnx" / "refs").mkdir()
    (hub / "models--microsoft--Phi-3-vision-128k-instruct-onnx" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    result = CliRunner().invoke(cli, ["info", "-m", "phi-3-vision:cpu-int4"])
    assert result.exit_code == 0, result.output
    assert "on disk but not usable" in result.stdout and "would fetch" in result.stdout


# -- bench: checked up front, honest exit codes ------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--engines", "onnx"], "--engines: unknown value 'onnx': choose from ort, torch"),
    (["--engines", ""], "--engines is empty"),
    (["--engines", "ort", "--scenarios", "chart,charts"], "--scenarios: unknown value 'charts'"),
    (["--engines", "ort", "--torch-dtype", "fp8"], "--torch-dtype: unknown value 'fp8'"),
    (["--engines", "ort", "--torch-attn", "flash"], "--torch-attn: unknown value 'flash'"),
])
def test_bench_refuses_bad_options_before_running_anything(tiny_dir, tmp_path, monkeypatch, args, needle):
    import phi3v_ort.bench.harness as harness

    monkeypatch.setattr(harness, "run", lambda cfg: pytest.fail("bench ran"))
    result = CliRunner().invoke(cli, ["bench", "--model-dir", str(tiny_dir), "--out", str(tmp_path / "b"), *args])
    assert result.exit_code != 0 and needle in result.stderr, result.output
    assert not list(tmp_path.iterdir())


def _as_if_torch_were_installed(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("torch", "transformers") else real(name, *a))


def _fake_run(ran: list):
    def run(cfg):
        ran.append(cfg)
        return {"engines": [{"label": "phi3v-ort", "engine": "phi3v-ort"}], "ratios": {}, "limits": {},
                "settings": {}, "environment": {}, "prepared": {}, "bandwidth": {"bytes_per_s": None, "source": ""}}
    return run


def test_bench_without_a_checkpoint_skips_the_torch_engine_and_says_how_to_make_one(tiny_dir, tmp_path,
                                                                                      monkeypatch):
    import phi3v_ort.bench.harness as harness

    ran: list = []
    monkeypatch.setattr(harness, "run", _fake_run(ran))
    monkeypatch.setattr(harness, "write", lambda result, out: [Path(out + ".json"), Path(out + ".md")])
    _as_if_torch_were_installed(monkeypatch)
    package = tmp_path / "pkg"  # a copy: regenerating the fixture leaves its checkpoint beside tests/fixtures/
    shutil.copytree(tiny_dir, package)
    result = CliRunner().invoke(cli, ["bench", "--model-dir", str(package), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.stderr
    skipped = result.stderr.splitlines()[0]
    assert skipped.startswith("Skipped: the torch engine needs a transformers checkpoint")
    assert f"{package.resolve()}.checkpoint" in skipped and "scripts/make_synthetic_model.py" in skipped
    assert [cfg.engines for cfg in ran] == [("ort",)]
    # asked for the torch engine alone, nothing can run: one Error line, nothing run
    alone = CliRunner().invoke(cli, ["bench", "--model-dir", str(package), "--engines", "torch", "--out",
                                     str(tmp_path / "b")])
    assert alone.exit_code == 1 and len(ran) == 1
    message = alone.stderr
    assert message.startswith("Error: the torch engine needs a transformers checkpoint")
    assert "--engines ort" in message and message.count("\n") == 1


def test_bench_without_the_build_extra_skips_the_torch_engine(tiny_dir, tmp_path, monkeypatch):
    import importlib.util

    import phi3v_ort.bench.harness as harness

    ran: list = []
    monkeypatch.setattr(harness, "run", _fake_run(ran))
    monkeypatch.setattr(harness, "write", lambda result, out: [Path(out + ".json"), Path(out + ".md")])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = CliRunner().invoke(cli, ["bench", "--model-dir", str(tiny_dir), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.stderr
    assert "Skipped: the torch engine needs the build extra (torch is missing): pip install 'phi3v-ort[build]'." \
        in result.stderr
    assert [cfg.engines for cfg in ran] == [("ort",)]


def test_bench_writes_into_the_data_folder_by_default_and_prints_the_files(tiny_dir, tmp_path, monkeypatch):
    import phi3v_ort.bench.harness as harness

    written = []
    monkeypatch.setattr(harness, "run", _fake_run([]))
    monkeypatch.setattr(harness, "write", lambda result, out: written.append(out) or [Path(out + ".json")])
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["bench", "--model-dir", str(tiny_dir), "--engines", "ort"])
    assert result.exit_code == 0, result.stderr
    out = Path(written[0])
    assert out.name == "bench" and out.parent.parent == tmp_path / "data" / "phi3v-ort" / "bench"
    assert out.parent.name.startswith("tiny-int4-cpu-")
    assert result.stdout.strip() == str(out) + ".json"


def test_no_chart_says_why():
    import importlib.util

    from phi3v_ort.bench.report import no_chart_reason

    one = {"engines": [{"label": "phi3v-ort"}, {"label": "transformers fp32 eager", "error": "exit 1"}]}
    assert no_chart_reason(one) == ("it compares phi3v-ort with the transformers reference, and only phi3v-ort "
                                    "ran")
    two = {"engines": [{"label": "phi3v-ort"}, {"label": "transformers fp32 eager"}]}
    if importlib.util.find_spec("matplotlib") is None:
        assert no_chart_reason(two) == "it needs matplotlib: pip install 'phi3v-ort[bench]'"
    else:
        assert "no scenario of this run generates" in no_chart_reason(two)


def test_bench_exits_non_zero_when_an_engine_fails(tiny_dir, tmp_path, monkeypatch):
    import phi3v_ort.bench.harness as harness

    def failing_run(cfg):
        return {"engines": [{"label": "phi3v-ort", "error": "worker exited with 1"}], "ratios": {}, "limits": {},
                "settings": {}, "environment": {}, "prepared": {}, "bandwidth": {"bytes_per_s": None, "source": ""}}

    monkeypatch.setattr(harness, "run", failing_run)
    monkeypatch.setattr(harness, "write", lambda result, out: [Path(out + ".json"), Path(out + ".md")])
    result = CliRunner().invoke(cli, ["bench", "--model-dir", str(tiny_dir), "--engines", "ort", "--out",
                                      str(tmp_path / "b")])
    assert result.exit_code == 1
    assert "Error: phi3v-ort failed (worker exited with 1" in result.stderr


def test_bench_on_the_fixture_runs_what_can_run_into_the_data_folder(tiny_dir, tmp_path):
    """The README's fixture, bench's defaults (both engines; no --out): the torch engine has no checkpoint, so it is
    skipped with the reason, phi3v-ort runs, and the results go to the data folder, not the current one."""
    package = tmp_path / "tiny-int4-cpu"  # a copy: no checkpoint beside it, whatever the fixture's folder holds
    shutil.copytree(tiny_dir, package)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-m", "phi3v_ort", "bench", "--model-dir", str(package), "--scenarios",
                             "text", "--reps", "1", "--warmup", "0", "--max-new-tokens", "2", "--threads", "1"],
                            capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.startswith("Skipped: the torch engine needs a transformers checkpoint")
    files = [Path(f) for f in result.stdout.split()]
    assert [f.name for f in files] == ["bench.json", "bench.md"]
    assert files[0].parent.parent == tmp_path / "data" / "phi3v-ort" / "bench" and all(f.is_file() for f in files)
    assert not list(cwd.iterdir())
    assert "No chart: it compares phi3v-ort with the transformers reference, and only phi3v-ort ran." \
        in result.stderr and "matplotlib" not in result.stderr
    assert "Warning" not in result.stderr
    data = json.loads(files[0].read_text())
    assert [e["label"] for e in data["engines"]] == ["phi3v-ort"] and "error" not in data["engines"][0]


# -- the phase line ----------------------------------------------------------------------------------------------

def test_run_shows_phases_on_a_terminal_and_nothing_otherwise(tiny_dir):
    args = [sys.executable, "-m", "phi3v_ort", "run", "--model-dir", str(tiny_dir), "-i", str(CHART),
            "--max-new-tokens", "3", QUESTION]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        stdout = proc.stdout.read()
        proc.wait(timeout=120)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    terminal = seen.decode()
    for phase in ("loading the model ...", "preparing image ...", "reading image (1,921 tokens) ..."):
        assert phase in terminal, terminal
    assert terminal.endswith("\r\x1b[2K")  # erased once the answer starts
    assert stdout.strip()
    # not a terminal: none of it
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and plain.stderr == "" and plain.stdout == stdout.decode()


def test_chat_phase_line_is_cleared_before_each_answer(tiny_dir):
    from phi3v_ort.cli.chat_loop import run_chat
    from phi3v_ort.cli.output import format_stats
    from phi3v_ort.engine.conversation import Conversation
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.cli.phase import Phase
    from phi3v_ort.engine.settings import GenerationSettings

    conversation = Conversation(load_model(tiny_dir, device="cpu"), GenerationSettings(max_new_tokens=2))
    out, err = io.StringIO(), io.StringIO()
    code = run_chat(conversation, [load_image(str(CHART))], io.StringIO("What is this?\nAnd now?\n"), out, err,
                    interactive=False, format_stats=format_stats, phase=Phase(err, enabled=True))
    assert code == 0
    shown = err.getvalue()
    assert shown.index("preparing image ...") < shown.index("reading image (1,921 tokens) ...")
    assert "reading the question ..." in shown  # the second turn brings no image
    assert shown.count("\r\x1b[2K") >= 6 and shown.endswith("\r\x1b[2K")
    assert "\x1b" not in out.getvalue() and len(out.getvalue().splitlines()) == 2
    # without a terminal (the default for a StringIO), nothing at all
    quiet = io.StringIO()
    run_chat(Conversation(conversation.model, GenerationSettings(max_new_tokens=2)), [], io.StringIO("Hi\n"),
             io.StringIO(), quiet, interactive=False, format_stats=format_stats, phase=Phase(quiet))
    assert quiet.getvalue() == ""
