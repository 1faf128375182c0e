"""Shared fixtures: the committed tiny package, images made on the fly, the build-tier gate, and the synthetic
packages the build tier needs (each built once per test run, started in the background as soon as collection
shows which ones are needed)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-int4-cpu"

# `run` and `chat` answer through a running `phi3v-ort serve` of the same model when they find one (its state file:
# phi3v_ort/client/registry.py). Tests see neither the user's servers nor each other's (the `served` fixture's), and
# leave no state file behind: a folder of this run's own, and no server unless a test asks for one
# (tests/cli/test_warm_server.py). Set here, at import, so every subprocess a test starts inherits it.
STATE_DIR = tempfile.mkdtemp(prefix="phi3v-ort-state-")
os.environ["PHI3V_ORT_STATE_DIR"] = STATE_DIR
os.environ["PHI3V_ORT_SERVER"] = "off"
ROOT = Path(__file__).resolve().parents[1]

BUILD_DEPS = ("torch", "transformers", "onnx", "onnxscript", "tokenizers", "safetensors")
MISSING_BUILD_DEPS = [m for m in BUILD_DEPS if importlib.util.find_spec(m) is None]
needs_build = pytest.mark.skipif(bool(MISSING_BUILD_DEPS),
                                 reason=f"needs the build extra (missing: {', '.join(MISSING_BUILD_DEPS)})")

# The synthetic packages of the build tier, by name: scripts/make_synthetic_model.py options (--preset tiny always).
# A test declares the ones it uses with @pytest.mark.synthetic(NAME, ...) and gets them from the `synthetic`
# fixture; each is built once per run, by the script, and shared.
SYNTHETIC = {
    "tiny-int4-cpu": (),  # the committed fixture's recipe
    "tiny-int4-cuda": ("--variant", "gpu-int4"),
    "tiny-fp32-cpu": ("--variant", "cpu-fp32"),
    "tiny-fp32-cpu-phi35": ("--variant", "cpu-fp32", "--family", "phi-3.5"),
}


class SyntheticBuilds:
    """Builds the declared packages one at a time in a background thread, at a lower CPU priority (nice 10), while
    the rest of the suite runs: on 2 cores the other tests leave a core idle much of the time, and a build that
    is still running when its test comes is simply waited for (then it runs at full speed)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="phi3v-synthetic-builds-"))
        self.lock = threading.Lock()
        self.done: dict[str, threading.Event] = {}
        self.results: dict[str, tuple[Path | None, str]] = {}
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self.thread: threading.Thread | None = None

    def start(self, names: list[str]) -> None:
        with self.lock:
            names = [n for n in names if n not in self.done]
            for name in names:
                self.done[name] = threading.Event()
        if names:
            self.thread = threading.Thread(target=self._run, args=(names, True), daemon=True,
                                           name="synthetic-builds")
            self.thread.start()

    def _run(self, names: list[str], background: bool) -> None:
        for name in names:
            self._build(name, background)

    def _build(self, name: str, background: bool) -> None:
        out = self.root / name
        cmd = [sys.executable, str(ROOT / "scripts" / "make_synthetic_model.py"), "--preset", "tiny", "--out",
               str(out), *SYNTHETIC[name]]
        if background and shutil.which("nice"):
            cmd = ["nice", "-n", "10", *cmd]
        try:
            with self.lock:
                if self.stopped:
                    raise RuntimeError("the test run ended")
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = self.proc.communicate(timeout=900)
            if self.proc.returncode != 0:
                self.results[name] = (None, f"exit {self.proc.returncode}: {stderr[-2000:]}")
            elif stdout.strip() != str(out.resolve()):  # the script prints the package folder, and only that
                self.results[name] = (None, f"the script printed {stdout!r}, not the folder {out}")
            else:
                self.results[name] = (out, "")
        except Exception as exc:  # noqa: BLE001 - reported by the test that asks for the build
            self.results[name] = (None, f"{type(exc).__name__}: {exc}")
        finally:
            self.done[name].set()

    def get(self, name: str) -> Path:
        """The package folder (its transformers checkpoint is `<folder>.checkpoint`); fails the test if the build
        failed, with the script's stderr."""
        with self.lock:
            started = name in self.done
            if not started:
                self.done[name] = threading.Event()
        if not started:
            self._build(name, background=False)
        self.done[name].wait()
        path, problem = self.results[name]
        if path is None:
            pytest.fail(f"building {name} with scripts/make_synthetic_model.py failed: {problem}")
        return path

    def close(self) -> None:
        with self.lock:
            self.stopped = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        if self.thread is not None:
            self.thread.join(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


_BUILDS: SyntheticBuilds | None = None


def _builds() -> SyntheticBuilds:
    global _BUILDS
    if _BUILDS is None:
        _BUILDS = SyntheticBuilds()
    return _BUILDS


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "synthetic(*names): the synthetic packages (conftest.SYNTHETIC) a build-tier "
                            "test uses; built once per run, in the background from collection on")


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what will not run
def pytest_collection_modifyitems(session, config, items) -> None:
    if MISSING_BUILD_DEPS or config.option.collectonly or os.environ.get("PHI3V_ORT_NO_PREBUILD"):
        return
    names: list[str] = []
    for item in items:
        for marker in item.iter_markers("synthetic"):
            names += [n for n in marker.args if n not in names]
    if names:
        _builds().start(names)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _BUILDS is not None:
        _BUILDS.close()
    shutil.rmtree(STATE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic() -> SyntheticBuilds:
    """`synthetic.get(NAME)`: a synthetic package of conftest.SYNTHETIC, built once per run by the script."""
    return _builds()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return FIXTURE


def fixed_crop_twin(package: Path, out: Path, slots: int = 17) -> Path:
    """A copy of `package` whose vision model declares a fixed crop axis of `slots` (as this project's exports did
    before the axis became dynamic, and as other exports may): the same graph and weights, fed all 17 slots."""
    pytest.importorskip("onnx", reason="declaring the crop axis needs the build extra's onnx")
    from phi3v_ort.export.crop_axis import declare_crop_slots
    from phi3v_ort.package.loading import read_package

    shutil.copytree(package, out)
    declare_crop_slots(out / read_package(out).files.vision, slots)
    return out


@pytest.fixture(scope="session")
def tiny_fixed17_dir(tiny_dir, tmp_path_factory) -> Path:
    """The committed fixture with its vision input declared as a fixed 17 crop slots."""
    return fixed_crop_twin(tiny_dir, tmp_path_factory.mktemp("fixed17") / "tiny-int4-cpu-fixed17")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import onnxruntime_genai as og

    config = og.Config(str(tiny_dir))
    config.clear_providers()
    return og.Model(config)


def sigint_default() -> None:
    """A child's preexec_fn for the tests that send it SIGINT: a suite started as a background job (`pytest &`) runs
    with SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler at all. The
    child starts as from a terminal's foreground instead, however the suite was launched."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python's own handler (a KeyboardInterrupt) for one in-process test, as in a foreground
    `phi3v-ort` (see sigint_default), and what was there before restored after it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def make_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A PNG with some structure (gradient + blocks) so different images give different features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                    np.full_like(x, int(rng.integers(0, 256)))], axis=-1).astype("uint8")
    Image.fromarray(img, "RGB").save(path)
    return path


@pytest.fixture
def png(tmp_path):
    def _make(width: int, height: int, seed: int = 0, name: str | None = None) -> Path:
        return make_png(tmp_path / (name or f"img_{width}x{height}_{seed}.png"), width, height, seed)

    return _make


class Served:
    """A `phi3v-ort serve` subprocess on loopback; its stderr (the access log included) goes to a file."""

    def __init__(self, model_dir: Path, folder: Path, *args: str, timeout: float = 90.0):
        import socket
        import time

        try:
            import httpx2 as httpx  # the maintained successor the openai client itself uses (as test_server.py)
        except ImportError:
            import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = folder / "serve-stderr.txt"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", str(model_dir),
                                          "--port", str(self.port), *args],
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        pytest.fail("the server did not start: " + self.stderr()[-3000:])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def served(tiny_dir, tmp_path_factory):
    """One `phi3v-ort serve` on the tiny fixture (2 workers, a queue of 8), shared by the test modules that need
    nothing else of a server: starting one costs seconds."""
    pytest.importorskip("starlette", reason="the server needs the serve extra")
    if importlib.util.find_spec("httpx2") is None:
        pytest.importorskip("httpx", reason="the server tests use httpx")
    server = Served(tiny_dir, tmp_path_factory.mktemp("served"), "--workers", "2", "--max-queue", "8",
                    "--max-tokens-limit", "8192")  # long answers (7,000 tokens) to observe
    yield server
    server.stop()
