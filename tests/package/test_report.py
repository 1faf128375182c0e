"""`phi3v-ort info` prints what a bug report needs (issue 23): machine, GPUs and driver, versions, providers, CUDA
libraries from pip, the settings in the environment; never a secret's value."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from phi3v_ort.cli import cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-int4-cpu"


def test_info_reports_what_a_bug_report_needs_and_hides_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    result = CliRunner().invoke(cli, ["info", "--model-dir", str(FIXTURE)])
    assert result.exit_code == 0, result.output
    fields = {line[:16].strip(): line[17:] for line in result.output.splitlines()}
    for name in ("model folder", "built for", "loaded on", "GPU", "python", "versions", "providers", "CUDA from pip",
                 "environment"):
        assert name in fields, name
    assert "onnxruntime-genai-cuda 0.18" in fields["versions"] and "CPU" in fields["providers"]
    assert "CUDA_VISIBLE_DEVICES=0" in fields["environment"] and "HF_TOKEN set" in fields["environment"]
    assert "hf_secret_value_123" not in result.output
