"""`phi3v-ort fetch`, `models` and fetch-on-first-use, against a loopback hub (tests/package/fake_hub.py) that the real
huggingface_hub client talks to over HTTP. No mock of huggingface_hub; no internet."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from phi3v_ort.package.catalog import PHI3, find_variant
from phi3v_ort.cli import cli
from phi3v_ort.package.fetch import locate

from tests.package.fake_hub import FakeHub

FOLDER = "cpu/cpu-int4-rtn-block-32-acc-level-4"
VARIANT = find_variant("phi-3-vision", "cpu-int4")
DATA = f"{FOLDER}/phi-3-v-128k-instruct-text-embedding.onnx.data"  # 4 MB: the biggest file of the fixture


@pytest.fixture
def hub(tiny_dir, tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub.add_repo_from_dir(PHI3, FOLDER, tiny_dir)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("PHI3V_ORT_MODEL", raising=False)
        yield hub


def fetch(*args):
    return CliRunner().invoke(cli, ["fetch", "-m", "phi-3-vision", "--variant", "cpu-int4", *args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_fresh_fetch_then_a_second_fetch_is_a_no_op(hub, tiny_dir):
    result = fetch()
    assert result.exit_code == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1]
    assert path.endswith(FOLDER)
    assert "Fetching phi-3-vision:cpu-int4" in result.stderr  # progress goes to stderr, the path to stdout
    for f in tiny_dir.iterdir():
        assert (tiny_dir / f.name).read_bytes() == open(os.path.join(path, f.name), "rb").read()
    assert locate(VARIANT).complete
    hub.clear_log()
    again = fetch()
    assert again.exit_code == 0 and again.stdout.strip().splitlines()[-1] == path
    assert hub.requests == []  # found complete on disk: not even a metadata request


def test_plain_folder_with_dir(hub, tmp_path):
    result = fetch("--dir", str(tmp_path / "plain"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "plain" / FOLDER)
    assert (tmp_path / "plain" / FOLDER / "genai_config.json").is_file()


def test_dropped_connection_is_retried_in_the_same_fetch(hub, tiny_dir):
    hub.drop_after_bytes = {DATA: 1_000_000}
    result = fetch()
    assert result.exit_code == 0, result.stderr
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(DATA)]
    assert len(gets) == 2  # cut once, fetched again within the call
    path = result.stdout.strip().splitlines()[-1]
    assert open(os.path.join(path, os.path.basename(DATA)), "rb").read() == (tiny_dir / os.path.basename(DATA)).read_bytes()


def test_connection_that_keeps_dropping_fails_then_the_next_fetch_completes(hub):
    hub.drop_after_bytes = {DATA: 500_000}
    hub.drop_repeat = 10
    failed = fetch()
    one_line_error(failed, "cannot reach the hub")
    local = locate(VARIANT)
    assert not local.complete  # what arrived is not usable, and nothing half-written sits under the final name
    hub.drop_after_bytes = {}
    hub.clear_log()
    result = fetch()
    assert result.exit_code == 0, result.stderr
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]}
    assert os.path.basename(DATA) in fetched
    assert "genai_config.json" not in fetched  # files completed by the failed run are not downloaded again
    assert locate(VARIANT).complete


def test_missing_file_on_the_server_is_reported_and_never_used(hub, tiny_dir):
    hub.missing_files = {DATA}
    one_line_error(fetch(), "missing on the hub")
    assert not locate(VARIANT).complete
    result = CliRunner().invoke(cli, ["run", "-m", "phi-3-vision:cpu-int4", "--device", "cpu", "hi"])
    one_line_error(result, "missing on the hub")  # run tries to fetch again rather than load a partial folder


def test_folder_gone_and_repo_gone(tiny_dir, tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub.add_repo_from_dir(PHI3, "cpu/some-other-folder", tiny_dir)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
        one_line_error(fetch(), PHI3, "has no folder", FOLDER)
        result = CliRunner().invoke(cli, ["fetch", "-m", "phi-3.5-vision", "--variant", "cpu-int4"])
        one_line_error(result, "microsoft/Phi-3.5-vision-instruct-onnx", "not found", "404")


def test_token_required(hub, monkeypatch):
    hub.require_token = "hf_secret"
    one_line_error(fetch(), "HF_TOKEN", "401")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    one_line_error(fetch(), "HF_TOKEN", "403")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert fetch().exit_code == 0


def test_legacy_and_unknown_names(hub):
    one_line_error(CliRunner().invoke(cli, ["fetch", "--variant", "cuda-fp16-legacy"]), "refused", "legacy")
    one_line_error(CliRunner().invoke(cli, ["fetch", "-m", "phi-4"]), "unknown model")
    one_line_error(CliRunner().invoke(cli, ["fetch", "--variant", "npu-int8"]), "unknown variant")


def test_run_fetches_on_first_use_then_answers(hub, tiny_dir, png, monkeypatch):
    image = png(640, 400, seed=1)
    monkeypatch.setenv("PHI3V_ORT_MODEL", "phi-3-vision")
    first = CliRunner().invoke(cli, ["run", "--device", "cpu", "--json", "--max-new-tokens", "6", "-i", str(image),
                                     "Describe the chart."])
    assert first.exit_code == 0, first.stderr
    assert "Fetching phi-3-vision:cpu-int4" in first.stderr
    direct = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "--json", "--max-new-tokens", "6",
                                      "-i", str(image), "Describe the chart."])
    assert json.loads(first.stdout)["token_ids"] == json.loads(direct.stdout)["token_ids"]
    hub.clear_log()
    second = CliRunner().invoke(cli, ["run", "-m", "phi-3-vision", "--device", "cpu", "--max-new-tokens", "2", "hi"])
    assert second.exit_code == 0 and "Fetching" not in second.stderr and hub.requests == []
    listing = CliRunner().invoke(cli, ["models"])
    assert "complete" in listing.stdout and FOLDER in listing.stdout


def _offline_run(tmp_path, extra_env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", **extra_env}
    env.pop("PHI3V_ORT_MODEL", None)
    return subprocess.run([sys.executable, "-m", "phi3v_ort", "run", "--device", "cpu", "--max-new-tokens", "2",
                           "hi"], capture_output=True, text=True, env=env, timeout=120)


def test_offline_with_nothing_cached_says_what_to_do(tmp_path):
    proc = _offline_run(tmp_path, {})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "offline" in line and "phi3v-ort fetch" in line and "--model-dir" in line


def test_offline_with_a_cached_copy_just_runs(hub, tmp_path):
    assert fetch().exit_code == 0
    proc = _offline_run(tmp_path, {"HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
