"""Build tier: `phi3v_ort.export.check`, the export's validation of a package against the torch reference.

Runs on the synthetic tiny packages (conftest.SYNTHETIC: scripts/make_synthetic_model.py, built once per run): an
fp32 package must pass against its own checkpoint and fail against one with a single decoder weight perturbed;
an int4 package is reported, not judged.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tests.conftest import needs_build

pytestmark = [needs_build, pytest.mark.build, pytest.mark.synthetic("tiny-fp32-cpu", "tiny-int4-cpu")]

STEPS = 32
PERTURBED = "model.layers.0.mlp.down_proj.weight"
# Gaussian noise of this fraction of the weight's std on that one matrix. Measured on the tiny fp32 package: 0.1
# moves the logits by 6e-3 relative (60x the 1e-4 tolerance), 0.01 by 6e-4, 0.001 by 6e-5 (that one passes).
NOISE = 0.1


def _checkpoint(package):
    return package.with_name(package.name + ".checkpoint")


@pytest.fixture(scope="module")
def fp32_package(synthetic):
    return synthetic.get("tiny-fp32-cpu")


@pytest.fixture(scope="module")
def int4_package(synthetic):
    return synthetic.get("tiny-int4-cpu")


@pytest.fixture(scope="module")
def fp32_report(fp32_package):
    from phi3v_ort.export.check import check_package

    return check_package(fp32_package, _checkpoint(fp32_package), steps=STEPS, log=lambda _: None)


@pytest.fixture(scope="module")
def perturbed_checkpoint(fp32_package, tmp_path_factory):
    """The fp32 package's checkpoint with noise added to one decoder weight."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = _checkpoint(fp32_package)
    out = tmp_path_factory.mktemp("perturbed") / "checkpoint"
    shutil.copytree(source, out)
    # one model.safetensors or shards with an index: perturb the file that holds the weight
    def holds(f):
        with safe_open(str(f), framework="pt") as opened:
            return PERTURBED in list(opened.keys())  # safe_open has no __contains__

    holder = next(f for f in sorted(out.glob("*.safetensors")) if holds(f))
    tensors = load_file(str(holder))
    weight = tensors[PERTURBED]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    tensors[PERTURBED] = (weight.float() + NOISE * weight.float().std() * noise).to(weight.dtype)
    save_file(tensors, str(holder), metadata={"format": "pt"})
    return out


def test_fp32_package_passes_against_its_own_checkpoint(fp32_report):
    r = fp32_report
    print("\n" + r.summary())
    assert r.error is None
    assert r.precision == "fp32"  # read from the package: no MatMulNBits, float32 inputs_embeds
    assert r.steps == STEPS and len(r.og_tokens) == STEPS  # min_length = max_length: no early stop
    assert r.image_tokens == 313 and r.prompt_tokens > r.image_tokens
    assert r.agreement == STEPS and r.first_disagreement is None and r.reference_tokens == r.og_tokens
    assert r.finite and 0 < r.max_ref_logit < 10
    assert r.relative_diff == pytest.approx(r.max_abs_diff / r.max_ref_logit)
    assert r.relative_diff <= 1e-5  # measured 4e-7; the pass threshold is 1e-4
    assert r.passed is True
    assert r.og_load_s > 0 and r.og_run_s > 0 and r.torch_load_s > 0 and r.torch_run_s > 0


def test_summary_is_one_line_and_the_dict_is_json(fp32_report):
    line = fp32_report.summary()
    assert "\n" not in line
    assert line.startswith("check: fp32 package vs torch reference on a built-in 336x336 image (313 image tokens, "
                           f"{STEPS} steps): top-1 agreement {STEPS}/{STEPS}, max |diff| ")
    assert line.endswith(": passed")
    d = json.loads(json.dumps(fp32_report.to_dict()))
    assert d["passed"] is True and d["top1_agreement"] == 1.0 and d["og_tokens"] == list(fp32_report.og_tokens)
    assert d["og_s"] == pytest.approx(fp32_report.og_load_s + fp32_report.og_run_s)


def test_fp32_package_fails_against_a_perturbed_checkpoint(fp32_package, perturbed_checkpoint):
    from phi3v_ort.export.check import FP32_RTOL, check_package

    r = check_package(fp32_package, perturbed_checkpoint, precision="fp32", steps=STEPS, log=lambda _: None)
    print("\n" + r.summary())
    assert r.error is None and r.finite
    assert r.steps == STEPS
    assert r.relative_diff > 10 * FP32_RTOL
    assert r.passed is False
    assert r.summary().endswith(f"FAILED (relative diff {r.relative_diff:.2g} > 1e-04)")


def test_int4_package_is_reported_not_judged(int4_package):
    from phi3v_ort.export.check import check_package, package_precision

    assert package_precision(int4_package) == "int4"
    r = check_package(int4_package, _checkpoint(int4_package), steps=STEPS, log=lambda _: None)
    print("\n" + r.summary())
    assert r.error is None
    assert r.precision == "int4" and r.tolerance is None
    assert r.passed is None
    assert r.finite and math.isfinite(r.relative_diff) and 0 < r.relative_diff < 1
    assert r.steps == STEPS and 0 <= r.agreement <= STEPS
    # Random weights leave tiny top-2 gaps that int4 rounding flips (measured 24/32 and 31/32 on two builds of the
    # tiny package), but each step is teacher-forced on og's own tokens: steps off by one would agree on ~none.
    assert r.agreement >= STEPS // 4
    assert f"top-1 agreement {r.agreement}/{STEPS}" in r.summary()
    assert r.summary().endswith("report only (int4 weights: no pass threshold)")


def test_an_engine_that_cannot_run_is_a_failure(fp32_package, tmp_path):
    from phi3v_ort.export.check import check_package

    missing = tmp_path / "no-such-checkpoint"
    r = check_package(fp32_package, missing, precision="int4", steps=4, log=lambda _: None)
    assert r.passed is False  # whatever the precision
    assert r.error is not None and r.error.startswith("the torch reference could not run: CheckpointError")
    assert len(r.og_tokens) == 4  # og ran; the reference did not
    assert "FAILED (the torch reference could not run" in r.summary() and "\n" not in r.summary()
    json.dumps(r.to_dict())  # NaN numbers become null

    with pytest.raises(ValueError, match="precision"):
        check_package(fp32_package, missing, precision="bf16")
