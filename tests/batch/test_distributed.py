"""`phi3v-ort batch --ray`: Ray Data model actors (phi3v_ort.batch.on_ray) on a local Ray instance started here
(ray.init(num_cpus=2), one for the whole module), the tiny fixture. Marked `ray`; skipped, with the reason, when
Ray Data is not installed. One test runs without Ray: a local batch never imports it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli

from tests.conftest import make_png

RAY_MISSING = importlib.util.find_spec("ray") is None


def needs_ray(test):
    """Marked `ray` (CI runs them: the test extra has ray[data]); skipped, with the reason, without Ray Data."""
    return pytest.mark.ray(pytest.mark.skipif(RAY_MISSING, reason="needs Ray Data: pip install -e '.[ray]'")(test))


TIMINGS = {"preprocess_s", "prefill_s", "time_to_first_token_s", "prefill_tokens_per_s", "decode_s",
           "decode_tokens_per_s", "load_s", "vision_embedding_prefill_s"}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(line: dict) -> dict:
    """A result line without what differs between two runs of the same item (timings)."""
    return {**line, "stats": {k: v for k, v in line.get("stats", {}).items() if k not in TIMINGS}}


def _items(tmp_path: Path) -> Path:
    """A JSONL of 4 images (relative paths), a text-only item and a bad image."""
    rows = [{"id": f"img{k}", "images": [f"img{k}.png"], "question": "What is in the image?"} for k in range(4)]
    for k in range(4):
        make_png(tmp_path / f"img{k}.png", 200 + 60 * k, 300 - 30 * k, seed=k)
    rows.insert(2, {"id": "text", "images": [], "question": "Say hello."})
    (tmp_path / "broken.png").write_text("not an image")
    rows.append({"id": "broken", "images": ["broken.png"], "question": "What is this?"})
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return items


def test_local_batch_never_imports_ray(tiny_dir, tmp_path):
    (tmp_path / "in").mkdir()
    make_png(tmp_path / "in" / "a.png", 300, 200)
    code = f"""
import sys
from click.testing import CliRunner
from phi3v_ort.cli import cli
r = CliRunner().invoke(cli, ["batch", {str(tmp_path / "in")!r}, "--question", "What?", "-o",
                             {str(tmp_path / "o.jsonl")!r}, "--model-dir", {str(tiny_dir)!r}, "--max-new-tokens", "2"])
assert r.exit_code == 0, r.output
loaded = [m for m in ("ray", "phi3v_ort.batch.on_ray") if m in sys.modules]
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in _lines(tmp_path / "o.jsonl")] == ["a.png"]


@needs_ray
def test_answerer_rows(tiny_dir, tmp_path):
    """The map_batches class on its own: paths and bytes, per-row settings, every bad row an error row."""
    import pyarrow as pa

    from phi3v_ort.batch.on_ray import SCHEMA, Answerer
    from phi3v_ort.engine.settings import GenerationSettings

    png = make_png(tmp_path / "a.png", 320, 240, seed=3)
    answerer = Answerer(model_dir=str(tiny_dir), device="cpu", settings=GenerationSettings(max_new_tokens=4),
                        threads=1)
    rows = [
        {"id": "path", "images": [str(png)], "question": "What?", "max_new_tokens": None, "crops": None},
        {"id": "bytes", "images": [png.read_bytes()], "question": "What?", "max_new_tokens": None, "crops": None},
        {"id": "short", "images": [png.read_bytes()], "question": "What?", "max_new_tokens": 2, "crops": 4},
        {"id": "garbage", "images": [b"not an image"], "question": "What?", "max_new_tokens": None, "crops": None},
        {"id": "crops", "images": [png.read_bytes()], "question": "What?", "max_new_tokens": None, "crops": 40},
        {"id": "noq", "images": [png.read_bytes()], "question": None, "max_new_tokens": None, "crops": None},
    ]
    out = answerer(pa.Table.from_pylist(rows[1:]))  # binary images
    out = pa.concat_tables([answerer(pa.Table.from_pylist(rows[:1])), out])
    assert out.schema == SCHEMA
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert by_id["path"]["error"] is None and len(by_id["path"]["token_ids"]) == 4
    assert by_id["bytes"]["token_ids"] == by_id["path"]["token_ids"]  # the same image, as bytes
    assert by_id["bytes"]["images"] == [f"<{len(png.read_bytes())} bytes>"]
    assert len(by_id["short"]["token_ids"]) == 2 and by_id["short"]["stats"]["image_tokens"] != \
        by_id["path"]["stats"]["image_tokens"]  # 4 crops: fewer image tokens
    assert "not an image Pillow can read" in by_id["garbage"]["error"]
    assert "crop budget must be 1 to 16" in by_id["crops"]["error"]
    assert by_id["noq"]["error"] == "no question"


@needs_ray
def test_same_answers_as_the_local_batch(ray_session, tiny_dir, tmp_path):
    from phi3v_ort.batch.runner import read_batch
    from phi3v_ort.batch.on_ray import run_ray_batch
    from phi3v_ort.engine.settings import GenerationSettings

    items = _items(tmp_path)
    local = tmp_path / "local.jsonl"
    result = CliRunner().invoke(cli, ["batch", str(items), "-o", str(local), "--model-dir", str(tiny_dir),
                                      "--max-new-tokens", "8"])
    assert result.exit_code == 3, result.output  # the broken image
    shapes = []
    p = run_ray_batch(read_batch(items), tmp_path / "ray.jsonl", GenerationSettings(max_new_tokens=8),
                      model_dir=str(tiny_dir), device="cpu", actors=2, on_start=shapes.append)
    assert (p.done, p.failed, p.unanswered) == (5, 1, 0)
    assert shapes[0]["actors"] == 2 and shapes[0]["blocks"] == 6 and shapes[0]["cpus_per_actor"] == 0.5
    ray_lines = {r["id"]: r for r in _lines(tmp_path / "ray.jsonl")}
    local_lines = {r["id"]: r for r in _lines(local)}
    assert sorted(ray_lines) == sorted(local_lines) and len(_lines(tmp_path / "ray.jsonl")) == 6
    for item_id, line in local_lines.items():  # answers, token ids, image tokens, key order: all the same
        assert list(ray_lines[item_id]) == list(line)
        assert _same(ray_lines[item_id]) == _same(line), item_id
    assert "not an image Pillow can read" in ray_lines["broken"]["error"]
    assert ray_lines["img0"]["images"] == ["img0.png"]  # as the input wrote it, as the local batch does


@needs_ray
def test_resume_answers_only_the_missing_ids(ray_session, tiny_dir, tmp_path):
    from phi3v_ort.batch.runner import read_batch
    from phi3v_ort.batch.on_ray import run_ray_batch
    from phi3v_ort.engine.settings import GenerationSettings

    items = _items(tmp_path)
    out = tmp_path / "out.jsonl"
    before = [{"id": "img0", "images": [], "question": "q", "answer": "kept", "token_ids": [], "stats": {}},
              {"id": "broken", "images": [], "question": "q", "error": "an earlier failure"},
              {"id": "img3", "images": [], "question": "q", "answer": "kept too", "token_ids": [], "stats": {}},
              {"id": "elsewhere", "question": "q", "error": "not in this input: untouched"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in before) + '{"id": "img1", "answer": "cut of')
    shapes = []
    p = run_ray_batch(read_batch(items), out, GenerationSettings(max_new_tokens=4), model_dir=str(tiny_dir),
                      device="cpu", actors=2, on_start=shapes.append)
    assert shapes[0]["items"] == 4  # img1, img2, text, and broken retried: not img0 / img3
    assert (p.done, p.failed, p.skipped, p.retried) == (3, 1, 2, 1)
    lines = _lines(out)
    assert lines[:3] == [before[0], before[2], before[3]]  # the retried error line is dropped, the rest kept
    ids = [r["id"] for r in lines]
    assert sorted(ids) == ["broken", "elsewhere", "img0", "img1", "img2", "img3", "text"]
    again = run_ray_batch(read_batch(items), out, GenerationSettings(max_new_tokens=4), model_dir=str(tiny_dir),
                          device="cpu", retry_errors=False, on_start=shapes.append)
    assert len(shapes) == 1 and (again.skipped, again.kept_failed) == (5, 1)  # nothing left: Ray not even asked


@needs_ray
def test_cli_ray_end_to_end_then_resumed_by_the_local_batch(ray_session, tiny_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        make_png(folder / f"p{k}.png", 240 + 80 * k, 200, seed=10 + k)
    (folder / "zz.png").write_text("not an image")
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(folder), "--question", "Describe the image.", "-o", str(out), "--model-dir", str(tiny_dir),
            "--max-new-tokens", "4"]
    result = CliRunner().invoke(cli, [*args, "--ray", "--actors", "2"])
    assert result.exit_code == 3, result.output
    assert "Ray: 4 items in 4 blocks, 2 model actors (CPU, 1 threads each" in result.stderr
    assert "3 answered, 1 failed, 0 already done" in result.stderr
    assert sorted(r["id"] for r in _lines(out)) == ["p0.png", "p1.png", "p2.png", "zz.png"]
    # the local batch resumes the file --ray wrote: nothing left to answer but the failed image
    local = CliRunner().invoke(cli, [*args, "--no-retry-errors"])
    assert "0 answered, 0 failed, 3 already done" in local.stderr and local.exit_code == 3


@needs_ray
def test_cli_ray_parquet_output_and_retry(ray_session, tiny_dir, tmp_path):
    import pyarrow.parquet as pq

    folder = tmp_path / "photos"
    folder.mkdir()
    make_png(folder / "a.png", 300, 200, seed=1)
    (folder / "b.png").write_text("not an image")
    out = tmp_path / "answers.parquet"
    args = ["batch", str(folder), "--question", "What?", "-o", str(out), "--model-dir", str(tiny_dir),
            "--max-new-tokens", "3", "--ray"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 3, first.output
    table = pq.read_table(out)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["a.png", "b.png"] and len(rows["a.png"]["token_ids"]) == 3
    assert rows["a.png"]["stats"]["image_tokens"] == [1921] and "not an image" in rows["b.png"]["error"]
    (folder / "b.png").unlink()
    make_png(folder / "b.png", 200, 300, seed=2)  # fixed: the retry answers it, its error row is dropped
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "1 answered, 0 failed, 1 already done" in second.stderr
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == ["a.png", "b.png"]
    refused = CliRunner().invoke(cli, ["batch", str(folder), "--question", "What?", "-o", str(out),
                                       "--model-dir", str(tiny_dir)])
    assert refused.exit_code == 1 and "a .parquet output needs --ray" in refused.stderr


def test_ray_options_need_ray(tiny_dir, tmp_path):
    result = CliRunner().invoke(cli, ["batch", str(tmp_path), "--question", "q", "-o", str(tmp_path / "o.jsonl"),
                                      "--model-dir", str(tiny_dir), "--actors", "2"])
    assert result.exit_code == 1 and "--actors needs --ray" in result.stderr
