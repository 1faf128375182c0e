"""`phi3v-ort export` refuses before any work: an --out that is, contains or lies inside the checkpoint or adapter
folder (--overwrite deleted the checkpoint), `--out /`, --overwrite over a folder that is not a package; a
config.json or adapter_config.json with a field out of shape (one line naming the field, 200,000 layers too);
tokenizer files that are symlinks out of the checkpoint folder. And the package's modes follow the umask."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import needs_build

pytestmark = [needs_build, pytest.mark.build]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from phi3v_ort.synthetic.presets import PRESETS
    from phi3v_ort.synthetic.random_checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "phi3v-ckpt"
    write_random_checkpoint(path, PRESETS["tiny"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).exists():
            shutil.copy(Path("tests/fixtures/tiny-int4-cpu") / name, path / name)
    (path / "NOTES.md").write_text("the user's own notes\n")
    return path


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    return copy


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi3v_ort", "export", *args, "--no-check"], capture_output=True,
                          text=True, timeout=600)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and proc.stderr.strip() == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- where the package goes -----------------------------------------------------------------------------------------

def test_out_equal_to_the_checkpoint_with_overwrite_deletes_nothing(ckpt):
    before = _tree(ckpt)
    one_line(export("--checkpoint", str(ckpt), "--out", str(ckpt), "--overwrite"), "is the checkpoint folder")
    assert _tree(ckpt) == before


@pytest.mark.parametrize("where,relation", [("same", "is"), ("inside", "lies inside"), ("parent", "contains"),
                                            ("via symlink", "is")])
@pytest.mark.parametrize("what", ["checkpoint", "adapter"])
def test_out_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path, where, relation, what):
    from phi3v_ort.export.exporter import ExportError, prepare_out

    source = tmp_path / "inputs" / what
    source.mkdir(parents=True)
    (source / "file").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(source)
    out = {"same": source, "inside": source / "pkg", "parent": tmp_path / "inputs", "via symlink": link}[where]
    with pytest.raises(ExportError, match=f"--out .* {relation} the {what} folder"):
        prepare_out(out.resolve(), True, {what: source})
    assert (source / "file").read_text() == "x"


def test_out_root_is_refused_before_any_work(ckpt):
    started = time.monotonic()
    one_line(export("--checkpoint", str(ckpt), "--out", "/", "--overwrite"), "root of the file system")
    assert time.monotonic() - started < 60  # no export ran first


def test_overwrite_replaces_only_a_package_or_nothing(tmp_path):
    from phi3v_ort.export.exporter import ExportError, prepare_out

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a package"):
        prepare_out(mine, True)
    (mine / "genai_config.json").write_text("{}")
    (mine / "drafts").mkdir()
    with pytest.raises(ExportError, match="not a package"):
        prepare_out(mine, True)
    package = tmp_path / "package"
    shutil.copytree("tests/fixtures/tiny-int4-cpu", package)
    prepare_out(package, True)  # an earlier export: fine
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_out(empty, False)


# -- config.json and adapter_config.json ----------------------------------------------------------------------------

def _with(field, value):
    def change(config):
        section, _, key = field.rpartition(".")
        (config[section] if section else config)[key] = value
        return config
    return change


CONFIG_CASES = {
    "a number": (lambda c: 5, "must hold a JSON object"),
    "a list": (lambda c: [c], "must hold a JSON object"),
    "100k deep": (lambda c: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "layers a string": (_with("num_hidden_layers", "2"), "num_hidden_layers must be a whole number"),
    "layers 200000": (_with("num_hidden_layers", 200_000), "num_hidden_layers must be a whole number from 1 to 1,024"),
    "hidden 0": (_with("hidden_size", 0), "hidden_size must be a whole number"),
    "heads 0": (_with("num_attention_heads", 0), "num_attention_heads must be a whole number"),
    "heads not a divisor": (_with("num_attention_heads", 3), "not a multiple of num_attention_heads"),
    "kv heads a float": (_with("num_key_value_heads", 1.5), "num_key_value_heads must be a whole number"),
    "image_dim_out x": (_with("img_processor.image_dim_out", "x"), "img_processor.image_dim_out"),
    "vocab missing": (lambda c: c.pop("vocab_size") and c, "vocab_size is missing"),
    "rope factor NaN": (lambda c: _with("rope_scaling.short_factor", [math.nan] * 8)(c), "rope_scaling.short_factor[0]"),
    "eps negative": (_with("rms_norm_eps", -1e-5), "rms_norm_eps must be a finite positive number"),
    "img_processor a list": (_with("img_processor", [1]), "img_processor must be an object"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_config_json_out_of_shape_is_one_line_naming_the_field(ckpt, case):
    from phi3v_ort.export.checkpoint import Checkpoint
    from phi3v_ort.reference.names import CheckpointError

    change, words = CONFIG_CASES[case]
    config_path = ckpt / "config.json"
    changed = change(json.loads(config_path.read_text()))
    config_path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    started = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(ckpt)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert time.monotonic() - started < 5  # before any module is built


@pytest.mark.parametrize("case", ["layers a string", "100k deep", "layers 200000"])
def test_the_cli_says_it_in_one_line(ckpt, tmp_path, case):
    change, words = CONFIG_CASES[case]
    config_path = ckpt / "config.json"
    changed = change(json.loads(config_path.read_text()))
    config_path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    one_line(export("--checkpoint", str(ckpt), "--out", str(tmp_path / "pkg")), words)
    assert not (tmp_path / "pkg").exists()


ADAPTER_CASES = {
    "r 0": ({"r": 0}, "r must be a whole number from 1"),
    "r four": ({"r": "four"}, "r must be a whole number"),
    "r true": ({"r": True}, "r must be a whole number"),
    "alpha a string": ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
    "alpha NaN": ({"lora_alpha": math.nan}, "lora_alpha must be a finite number"),
    "alpha inf": ({"lora_alpha": math.inf}, "lora_alpha must be a finite number"),
    "rank_pattern regex": ({"rank_pattern": {"([": 4}}, "rank_pattern key '([' is not a regular expression"),
    "rank_pattern 0": ({"rank_pattern": {"qkv_proj": 0}}, "rank_pattern['qkv_proj'] must be a whole number"),
    "alpha_pattern NaN": ({"alpha_pattern": {"qkv_proj": math.nan}}, "alpha_pattern['qkv_proj'] must be a finite"),
    "rank_pattern a list": ({"rank_pattern": [4]}, "rank_pattern must be an object"),
    "rslora a string": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_an_adapter_config_out_of_shape_is_one_line_naming_the_field(tmp_path, case):
    from phi3v_ort.reference.lora import AdapterError, LoraAdapter
    from tests.export.test_export_adapter import write_adapter

    config, words = ADAPTER_CASES[case]
    write_adapter(tmp_path / "lora", {"model.layers.0.self_attn.qkv_proj": (96, 32, 4)}, **config)
    with pytest.raises(AdapterError) as info:
        LoraAdapter.open(tmp_path / "lora")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_deep_adapter_config_is_one_line(tmp_path):
    from phi3v_ort.reference.lora import AdapterError, LoraAdapter
    from tests.export.test_export_adapter import write_adapter

    write_adapter(tmp_path / "lora", {"model.layers.0.self_attn.qkv_proj": (96, 32, 4)})
    (tmp_path / "lora" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        LoraAdapter.open(tmp_path / "lora")


# -- tokenizer files and modes --------------------------------------------------------------------------------------

def test_a_tokenizer_symlink_out_of_the_checkpoint_is_refused(ckpt, tmp_path):
    from phi3v_ort.export.checkpoint import Checkpoint
    from phi3v_ort.reference.names import CheckpointError

    secret = tmp_path / "secret"
    secret.write_text('{"private": true}')
    os.chmod(secret, 0o600)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        target = ckpt / name
        saved = target.read_bytes() if target.exists() else None
        target.unlink(missing_ok=True)
        target.symlink_to(secret)
        with pytest.raises(CheckpointError, match=f"{name} is a symlink to .*secret, outside the checkpoint"):
            Checkpoint.open(ckpt)
        target.unlink()
        if saved is not None:
            target.write_bytes(saved)
    fifo = ckpt / "special_tokens_map.json"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        Checkpoint.open(ckpt)


def test_symlinks_inside_the_checkpoint_or_its_hub_cache_are_fine(checkpoint, tmp_path):
    from phi3v_ort.export.checkpoint import tokenizer_source

    repo = tmp_path / "models--microsoft--x"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/f00d")
    (snapshot / "real.json").write_text("{}")
    (snapshot / "tokenizer_config.json").symlink_to("real.json")
    assert tokenizer_source(snapshot, "tokenizer.json") == (repo / "blobs" / "f00d").resolve()
    assert tokenizer_source(snapshot, "tokenizer_config.json") == (snapshot / "real.json").resolve()
    assert tokenizer_source(snapshot, "special_tokens_map.json") is None


def test_package_modes_follow_the_umask(tmp_path):
    from phi3v_ort.export.exporter import replace_dir

    new = tmp_path / "new"
    new.mkdir(mode=0o700)
    (new / "genai_config.json").write_text("{}")
    os.chmod(new / "genai_config.json", 0o600)
    old_mask = os.umask(0o027)
    try:
        replace_dir(new, tmp_path / "pkg")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "pkg").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "pkg" / "genai_config.json").stat().st_mode) == 0o640
