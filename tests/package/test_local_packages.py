"""Local packages by name (issue 23): the models folder, `phi3v-ort models`, `-m NAME`, `fetch --name`; `prepare`
fetching only the tokenizer and configs; the offline message. Against the loopback hub of tests/package/fake_hub.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError
from phi3v_ort.package import contract, local
from phi3v_ort.package.catalog import PHI3, find_variant, input_files
from phi3v_ort.package.fetch import model_names, model_target

from tests.package.fake_hub import FakeHub

FOLDER = "cpu/cpu-int4-rtn-block-32-acc-level-4"
VARIANT = find_variant("phi-3-vision", "cpu-int4")


@pytest.fixture
def models(tmp_path, monkeypatch):
    """An empty models folder of this test ($PHI3V_ORT_MODELS), the hub cache empty, no default model."""
    folder = tmp_path / "models"
    monkeypatch.setenv("PHI3V_ORT_MODELS", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("PHI3V_ORT_MODEL", raising=False)
    return folder


@pytest.fixture
def hub(tiny_dir, models, monkeypatch):
    with FakeHub() as hub:
        hub.add_repo_from_dir(PHI3, FOLDER, tiny_dir)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_models_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PHI3V_ORT_MODELS", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert local.models_dir() == tmp_path / "home" / ".local" / "share" / "phi3v-ort" / "models"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert local.models_dir() == tmp_path / "data" / "phi3v-ort" / "models"
    monkeypatch.setenv("PHI3V_ORT_MODELS", str(tmp_path / "mine"))
    assert local.models_dir() == tmp_path / "mine"


def test_models_lists_local_packages_and_m_runs_one_by_name(tiny_dir, models, png):
    shutil.copytree(tiny_dir, models / "my-model")
    (models / "broken").mkdir()
    (models / "my-model.checkpoint").mkdir()  # the synthetic builder's checkpoint: not a package
    (models / ".x.fetching").mkdir()  # a fetch's staging folder: not listed
    listing = invoke("models")
    assert listing.exit_code == 0, listing.stderr
    lines = listing.stdout.split(f"Local packages (-m NAME) in {models}", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["broken", "my-model"]
    size = sum(f.stat().st_size for f in tiny_dir.iterdir()) / 2**30
    assert lines[1].split(None, 1)[1] == f"cpu, float32 I/O, {size:.2f} GB: {models / 'my-model'}"
    assert "NOT USABLE" in lines[0] and "genai_config.json" in lines[0]

    image = png(120, 80)
    by_name = invoke("run", "-m", "my-model", "--json", "--max-new-tokens", 4, "-i", image, "What is it?")
    by_dir = invoke("run", "--model-dir", tiny_dir, "--json", "--max-new-tokens", 4, "-i", image, "What is it?")
    assert by_name.exit_code == 0, by_name.stderr
    assert json.loads(by_name.stdout)["token_ids"] == json.loads(by_dir.stdout)["token_ids"]


def test_an_empty_models_folder_says_how_to_fill_it(models):
    listing = invoke("models")
    assert listing.exit_code == 0
    assert f"Local packages (-m NAME) in {models} ($PHI3V_ORT_MODELS): none yet" in listing.stdout
    assert "--name NAME" in listing.stdout


def test_an_unknown_name_lists_both_kinds(tiny_dir, models):
    shutil.copytree(tiny_dir, models / "my-model")
    result = invoke("run", "-m", "my-modle", "hi")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("Error: unknown model 'my-modle'")
    assert "phi-3-vision, phi-3.5-vision" in line and str(models) in line and "my-model" in line


def test_catalog_names_keep_priority(tiny_dir, models):
    shutil.copytree(tiny_dir, models / "phi-3-vision")  # put there by hand: -m still means the published build
    assert model_target("phi-3-vision", None, "cpu") == VARIANT
    shutil.copytree(tiny_dir, models / "mine")
    assert model_target("mine", None, "cpu") == models / "mine"
    with pytest.raises(Phi3vError, match="catalog model's name"):
        local.package_path("phi-3-vision")
    for bad in ("../up", "a/b", "x:cpu", ".hidden", "m.checkpoint", ""):
        with pytest.raises(Phi3vError, match="cannot name a local package"):
            local.package_path(bad)


def test_model_names_give_what_a_server_would_show(tiny_dir, models):
    shutil.copytree(tiny_dir, models / "mine")
    assert model_names("mine", None, "cpu") == ("mine",)
    assert model_names(None, str(models / "mine"), "cpu") == ("mine",)  # a local package given by its folder
    assert model_names(None, str(tiny_dir), "cpu") == ("tiny-int4-cpu",)
    assert model_names("phi-3-vision", None, "cpu") == ("phi-3-vision", "phi-3-vision:cpu-int4")
    assert model_names("phi-3-vision:cpu-int4", None, "cpu") == ("phi-3-vision:cpu-int4",)


def test_fetch_name_makes_a_local_package(hub, models, tiny_dir):
    first = invoke("fetch", "-m", "phi-3-vision", "--variant", "cpu-int4", "--name", "phi3v-cpu")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.strip() == str(models / "phi3v-cpu")
    assert sorted(p.name for p in models.iterdir()) == ["phi3v-cpu"]  # the staging folder is gone
    for f in tiny_dir.iterdir():
        assert (models / "phi3v-cpu" / f.name).read_bytes() == f.read_bytes()
    hub.clear_log()
    again = invoke("fetch", "--variant", "cpu-int4", "--name", "phi3v-cpu")
    assert again.exit_code == 0 and again.stdout.strip() == str(models / "phi3v-cpu") and hub.requests == []
    ran = invoke("run", "-m", "phi3v-cpu", "--max-new-tokens", 2, "hi")
    assert ran.exit_code == 0 and ran.stdout.strip(), ran.stderr
    assert "phi3v-cpu" in invoke("models").stdout


def test_fetch_name_refuses_what_it_cannot_do(hub, models, tiny_dir):
    for args, needle in ((["--name", "phi-3-vision"], "catalog model's name"),
                         (["--name", "a", "--dir", str(models)], "either --dir or --name"),
                         (["--name", "bad/name"], "cannot name a local package")):
        result = invoke("fetch", "--variant", "cpu-int4", *args)
        assert result.exit_code == 1 and needle in result.stderr, result.stderr
    (models / "taken").mkdir(parents=True)
    (models / "taken" / "notes.txt").write_text("precious\n")
    result = invoke("fetch", "--variant", "cpu-int4", "--name", "taken")
    assert result.exit_code == 1 and "choose another --name" in result.stderr
    assert (models / "taken" / "notes.txt").read_text() == "precious\n"  # never overwritten
    assert not hub.requests


def test_export_and_the_synthetic_builder_take_a_name_instead_of_out(models, monkeypatch, tmp_path):
    from phi3v_ort.synthetic import cli as synthetic_cli

    seen = []

    def fake_build(target, opts, checkpoint_out):
        seen.append(Path(target))
        raise RuntimeError("stop here")

    monkeypatch.setattr("phi3v_ort.synthetic.package.build_package", fake_build)
    result = CliRunner().invoke(synthetic_cli.main, ["--name", "tiny-local"])
    assert result.exit_code == 1 and seen == [models / "tiny-local"], result.output
    both = CliRunner().invoke(synthetic_cli.main, ["--name", "a", "--out", str(tmp_path / "b")])
    assert both.exit_code == 2 and "either --out DIR or --name NAME" in both.output
    for args in (["--name", "a", "--out", str(tmp_path / "b")], []):
        refused = invoke("export", "--checkpoint", tmp_path, *args)
        assert refused.exit_code == 1 and "either --out DIR or --name NAME" in refused.stderr, refused.stderr


# -- prepare: the tokenizer and configs only ------------------------------------------------------------------

def test_prepare_fetches_only_what_it_reads_then_run_fetches_the_rest(hub, tiny_dir, png):
    image = png(200, 120)
    result = invoke("prepare", "-m", "phi-3-vision:cpu-int4", "--json", "-i", image, "Describe it.")
    assert result.exit_code == 0, result.stderr
    assert "Fetching the tokenizer and configs of phi-3-vision:cpu-int4" in result.stderr
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]}
    assert fetched == set(input_files(VARIANT)) and not any(f.endswith(".data") for f in fetched)
    direct = invoke("prepare", "--model-dir", tiny_dir, "--json", "-i", image, "Describe it.")
    assert json.loads(result.stdout) == json.loads(direct.stdout)
    hub.clear_log()
    again = invoke("prepare", "-m", "phi-3-vision:cpu-int4", "-i", image, "Describe it.")
    assert again.exit_code == 0 and hub.requests == [] and "Fetching" not in again.stderr  # on disk now
    ran = invoke("run", "-m", "phi-3-vision:cpu-int4", "--max-new-tokens", 2, "hi")
    assert ran.exit_code == 0, ran.stderr
    assert "Fetching phi-3-vision:cpu-int4" in ran.stderr  # now the whole package


def test_input_files_are_the_side_files_and_the_vision_graph():
    assert input_files(VARIANT) == (*contract.SIDE_FILES, contract.PHI3_FILE_NAMES.vision)
    phi35 = find_variant("phi-3.5-vision", "cpu-int4")
    assert input_files(phi35)[-1] == contract.PHI35_FILE_NAMES.vision


def test_prepare_prints_the_prompt(tiny_dir, png):
    result = invoke("prepare", "--model-dir", tiny_dir, "-i", png(64, 48), "--system", "Be brief.", "What is it?")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(invoke("prepare", "--model-dir", tiny_dir, "--json", "-i", png(64, 48), "--system",
                              "Be brief.", "What is it?").stdout)["prompt"]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("prompt")
    body = lines[1: 1 + len(shown.splitlines())]
    assert [line[2:] for line in body] == shown.splitlines() and "What is it?" in shown
    assert any(line.startswith("prompt tokens") for line in lines)


# -- offline ----------------------------------------------------------------------------------------------------

def _run_offline(tmp_path, extra_env):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PHI3V_ORT_MODELS": str(tmp_path / "models"), **extra_env}
    env.pop("PHI3V_ORT_MODEL", None)
    return subprocess.run([sys.executable, "-m", "phi3v_ort", "run", "--device", "cpu", "hi"], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("env, cause", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set (offline): unset it"),
                                        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the hub")])
def test_the_offline_message_names_the_ways_out(tmp_path, env, cause):
    proc = _run_offline(tmp_path, env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and cause in line
    for way in ("HTTPS_PROXY", "HF_ENDPOINT", "HF_TOKEN", "--dir DIR", "--model-dir"):
        assert way in line, line
    assert "on a machine with access" not in line
