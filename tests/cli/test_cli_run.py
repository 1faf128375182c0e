"""`phi3v-ort run` on the fixture: parity with a bare og loop, streaming, stats, and every bad input."""

import http.server
import json
import shutil
import socket
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from phi3v_ort.package import contract
from phi3v_ort.cli import cli

from tests.conftest import sigint_default
from tests.engine.test_bare_generation import _prompt, bare_generate, bare_generate_arrays

QUESTIONS = {
    0: "Tell me a joke.",
    1: "Could you please introduce this stock to me?",
    2: "What is difference in this two images?",
}


def run_cli(*args, input=None):
    result = CliRunner().invoke(cli, ["run", *map(str, args)], input=input)
    return result


def run_json(tiny_dir, question, images=(), *extra):
    args = ["--model-dir", tiny_dir, "--json", "--max-new-tokens", 10, *extra]
    for img in images:
        args += ["-i", img]
    result = run_cli(*args, question)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_json_tokens_equal_a_bare_og_loop(tiny_dir, tiny_model, png, n_images, tmp_path):
    """The default pipeline: og's generator fed the arrays `phi3v-ort prepare` shows gives the same tokens as
    `run`. With --processor og: the same tokens as a bare og loop on og's own processor."""
    paths = [png(640, 400, seed=1), png(300, 700, seed=2)][:n_images]
    out = run_json(tiny_dir, QUESTIONS[n_images], paths)
    args = ["prepare", "--model-dir", str(tiny_dir), "--json", *[a for p in paths for a in ("-i", str(p))]]
    pixels = tmp_path / "pixels.npy"
    prepared = CliRunner().invoke(cli, [*args, *(["--save-pixels", str(pixels)] if paths else []), QUESTIONS[n_images]])
    assert prepared.exit_code == 0, prepared.stderr
    shown = json.loads(prepared.stdout)
    assert shown["prompt_tokens"] == out["prompt_tokens"] and shown["input_ids"][0] == 1  # BOS, as the reference
    arrays = {"input_ids": np.asarray([shown["input_ids"]], dtype=np.int32)}
    if paths:
        arrays.update(pixel_values=np.load(pixels), image_sizes=np.asarray(shown["image_sizes"], dtype=np.int64),
                      num_image_tokens=np.asarray([shown["num_image_tokens"]], dtype=np.int64))
    assert out["token_ids"] == bare_generate_arrays(tiny_model, arrays, max_new_tokens=10)

    og_out = run_json(tiny_dir, QUESTIONS[n_images], paths, "--processor", "og")
    _, expected = bare_generate(tiny_model, _prompt(n_images, QUESTIONS[n_images]), paths, max_new_tokens=10)
    assert og_out["token_ids"] == expected
    assert out["num_image_tokens"] == [contract.image_tokens_for(640, 400), contract.image_tokens_for(300, 700)][:n_images]
    assert out["finish_reason"] in ("stop", "length")
    assert out["stats"]["max_length"] == out["prompt_tokens"] + 10  # sized per request, not the context


def test_streamed_text_equals_the_json_text(tiny_dir, png):
    image = png(640, 400, seed=1)
    streamed = run_cli("--model-dir", tiny_dir, "--max-new-tokens", 10, "-i", image, QUESTIONS[1])
    assert streamed.exit_code == 0
    assert streamed.stdout == run_json(tiny_dir, QUESTIONS[1], [image])["text"] + "\n"
    assert streamed.stderr == ""  # only the answer on stdout, nothing else


def test_stream_events_join_to_the_final_text(tiny_dir, png):
    from phi3v_ort.engine.generation import Finished, TokenEvent, stream
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.engine.settings import GenerationSettings

    model = load_model(tiny_dir, device="cpu")
    events = list(stream(model, "Describe.", [load_image(str(png(500, 500)))], GenerationSettings(max_new_tokens=16)))
    *tokens, done = events
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(done, Finished)
    assert "".join(e.text for e in tokens) == done.text
    assert [e.token_id for e in tokens] == list(done.token_ids)
    s = done.stats
    assert s.generated_tokens == len(tokens) and s.time_to_first_token_s >= s.preprocess_s > 0
    assert s.kv_cache_bytes == 2 * 2 * 2 * 16 * 4 * s.max_length  # 2 layers, 2 KV heads, head 16, fp32


def test_stats_go_to_stderr(tiny_dir, png):
    result = run_cli("--model-dir", tiny_dir, "--max-new-tokens", 3, "--stats", "-i", png(64, 64), "Hi")
    assert result.exit_code == 0
    assert "time to 1st token" in result.stderr and "KV cache" in result.stderr
    assert "time to 1st token" not in result.stdout


def test_sampling_is_seeded(tiny_dir):
    a = run_json(tiny_dir, "Hi", (), "--temperature", "0.9", "--top-p", "0.9", "--seed", "7")
    b = run_json(tiny_dir, "Hi", (), "--temperature", "0.9", "--top-p", "0.9", "--seed", "7")
    assert a["token_ids"] == b["token_ids"]


def test_user_placed_tags_are_kept(tiny_dir, png):
    a, b = png(640, 400, seed=1), png(300, 700, seed=2)
    out = run_json(tiny_dir, "first this: <|image_1|>\nthen that <|image_2|>\nwhat changed?", [a, b])
    assert out["num_image_tokens"] == [contract.image_tokens_for(640, 400), contract.image_tokens_for(300, 700)]


def test_image_from_stdin_equals_the_file(tiny_dir, png):
    path = png(640, 400, seed=1)
    from_file = run_json(tiny_dir, QUESTIONS[1], [path])
    result = run_cli("--model-dir", tiny_dir, "--json", "--max-new-tokens", 10, "-i", "-", QUESTIONS[1],
                     input=path.read_bytes())
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == from_file["token_ids"]


def test_phi35_file_names_load(tiny_dir, tmp_path, png):
    """File names come from genai_config.json, never hard-coded: rename the models the Phi-3.5 way."""
    pkg = tmp_path / "phi35"
    shutil.copytree(tiny_dir, pkg)
    cfg = json.loads((pkg / "genai_config.json").read_text())
    for role, new in (("vision", contract.PHI35_FILE_NAMES.vision), ("embedding", contract.PHI35_FILE_NAMES.embedding),
                      ("decoder", contract.PHI35_FILE_NAMES.decoder)):
        (pkg / cfg["model"][role]["filename"]).rename(pkg / new)  # the .data files keep the names the .onnx cite
        cfg["model"][role]["filename"] = new
    (pkg / "genai_config.json").write_text(json.dumps(cfg))
    image = png(640, 400, seed=1)
    assert run_json(pkg, QUESTIONS[1], [image])["token_ids"] == run_json(tiny_dir, QUESTIONS[1], [image])["token_ids"]


def test_info(tiny_dir):
    result = CliRunner().invoke(cli, ["info", "--model-dir", str(tiny_dir)])
    assert result.exit_code == 0
    for needle in ("phi3v", "2 layers", "8192 tokens", "onnxruntime-genai-cuda", "GPU"):
        assert needle in result.stdout


# -- bad input: one sentence on stderr, non-zero exit, no traceback ------------------------------------------------

def assert_one_line_error(result, *needles):
    assert result.exit_code not in (0, None), result.stdout
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def loopback_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(root / "ok.png")
    (root / "page.html").write_text("<html>not an image</html>")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_image_works(tiny_dir, loopback_server):
    out = run_json(tiny_dir, "What is this?", [f"{loopback_server}/ok.png"])
    assert out["num_image_tokens"] == [contract.image_tokens_for(64, 48)]


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad_images(tmp_path, png):
    text_png = tmp_path / "notes.png"
    text_png.write_text("this is text, not a PNG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png(300, 300, seed=4).read_bytes()[:400])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 MP in a few KB
    return {"missing": (tmp_path / "nope.png", "not found"), "directory": (tmp_path, "directory"),
            "empty": (empty, "empty"), "text": (text_png, "not an image"), "truncated": (truncated, "decoded"),
            "bomb": (bomb, "decompression bomb")}


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "text", "truncated", "bomb"])
def test_bad_image_files(tiny_dir, tmp_path, png, case):
    path, needle = _bad_images(tmp_path, png)[case]
    assert_one_line_error(run_cli("--model-dir", tiny_dir, "-i", path, "What is this?"), needle)


def test_url_errors(tiny_dir, loopback_server):
    assert_one_line_error(run_cli("--model-dir", tiny_dir, "-i", f"{loopback_server}/page.html", "x"), "not an image")
    assert_one_line_error(run_cli("--model-dir", tiny_dir, "-i", f"{loopback_server}/missing.png", "x"), "404")
    assert_one_line_error(run_cli("--model-dir", tiny_dir, "-i", f"http://127.0.0.1:{_closed_port()}/a.png", "x"),
                          "could not download")


@pytest.mark.parametrize("question, n_images, needle", [
    ("<|image_1|>\n<|image_2|>\nCompare.", 1, "<|image_2|>"),   # more tags than images
    ("<|image_1|>\nCompare.", 2, "only 1"),                      # fewer tags than images
    ("<|image_0|>\nWhat?", 1, "<|image_0|>"),                    # unknown tag
    ("<|image_2|> then <|image_1|>", 2, "in order"),             # the model reads features in order
    ("<|image_9|> what?", 0, "no image was given"),              # a tag without images
])
def test_bad_image_tags(tiny_dir, png, question, n_images, needle):
    args = ["--model-dir", tiny_dir]
    for k in range(n_images):
        args += ["-i", png(100, 100, seed=k)]
    assert_one_line_error(run_cli(*args, question), needle)


def test_prompt_longer_than_the_context(tiny_dir):
    result = run_cli("--model-dir", tiny_dir, "hello " * 9000)
    assert_one_line_error(result, "context is 8192")


def test_bad_device(tiny_dir):
    assert_one_line_error(run_cli("--model-dir", tiny_dir, "--device", "tpu", "x"), "unknown device")


def test_cuda_without_gpu(tiny_dir):
    from phi3v_ort.package.device import gpu_count

    if gpu_count():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    assert_one_line_error(run_cli("--model-dir", tiny_dir, "--device", "cuda", "x"), "no NVIDIA GPU")


def test_missing_and_incomplete_model_dirs(tiny_dir, tmp_path):
    assert_one_line_error(run_cli("--model-dir", tmp_path / "nowhere", "x"), "not found")
    assert_one_line_error(run_cli("--model-dir", tmp_path, "x"), "genai_config.json")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir, partial)
    (partial / contract.PHI3_FILE_NAMES.vision).unlink()
    assert_one_line_error(run_cli("--model-dir", partial, "x"), "incomplete")


def test_legacy_package_names_the_new_repo(tiny_dir, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_dir, legacy)
    cfg = json.loads((legacy / "genai_config.json").read_text())
    cfg["model"]["vision"]["outputs"] = {"visual_features": "visual_features"}
    (legacy / "genai_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("--model-dir", legacy, "x"), "legacy", "microsoft/Phi-3-vision-128k-instruct-onnx")


def test_ctrl_c_keeps_the_partial_answer(tiny_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "run", "--model-dir", str(tiny_dir),
                             "--max-new-tokens", "8000", "Tell me a long story."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=sigint_default)
    first = proc.stdout.read(1)  # the answer has started streaming
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert len(first + rest) > 1
    assert err.decode().strip() == "Interrupted."


def test_ctrl_c_during_the_prefill_ends_run_at_once(tiny_dir, monkeypatch, python_sigint):
    """og holds the GIL for the whole prefill, so Python's handler could not run until it returns: during the
    prefill `run` leaves SIGINT to its default action (the process ends at once), and gives Python's handler back
    for the answer (Ctrl-C then keeps the partial text: test_ctrl_c_keeps_the_partial_answer)."""
    import signal

    from phi3v_ort.engine import generation

    seen = []
    real_stream = generation.stream_prepared  # what run calls once the inputs are prepared (the phase line's step)

    def watching_stream(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))  # before the prefill starts
        for event in real_stream(*args, **kwargs):
            seen.append(signal.getsignal(signal.SIGINT))
            yield event

    monkeypatch.setattr(generation, "stream_prepared", watching_stream)
    result = run_cli("--model-dir", tiny_dir, "--max-new-tokens", 3, "hello")
    assert result.exit_code == 0, result.stderr
    assert seen[0] is signal.SIG_DFL  # the prefill: Ctrl-C ends the process
    assert seen[-1] is signal.default_int_handler  # the answer: Ctrl-C is a KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
