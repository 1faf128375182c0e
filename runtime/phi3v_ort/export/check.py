"""After an export: does the ONNX package compute what the torch reference computes on the same weights?

`check_package(package, checkpoint)` runs one small, fixed request through both engines, one after the other:

1. onnxruntime-genai: the package loaded on the CPU (CUDA-variant packages too: og's CPU provider runs fp16 I/O),
   the built-in prompt and image prepared by the runtime's own pipeline (`generation.prepare`, 1 crop), and a bare
   greedy loop of exactly `steps` tokens that never stops at an end token (og's `min_length = max_length`, as the
   benchmarks' ignore-eos), keeping the logits each token was picked from. The og model is then freed: a
   full-size model cannot be in memory twice.
2. torch: `Phi3VisionReference` on the checkpoint in float32 (plus the fine-tune's adapter, if any), ONE
   teacher-forced forward over the prompt followed by og's first `steps - 1` tokens, keeping only the logits of
   the last `steps` positions: the reference's logits for exactly the steps og picked from.

og 0.18, as measured: `min_length` is honoured (an end token is masked while choosing, and generation runs to
`max_length`), but `get_logits()` returns the logits as the model gave them, the end token unmasked. Top-1
agreement therefore compares og's token with the reference's argmax with the package's end token(s) masked, as
og chose; the logit difference is over every column.

The verdict depends on the package's precision (see `check_package`). Needs the `build` extra (torch,
transformers, safetensors, onnx).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from phi3v_ort.export.memory import release_memory

PRECISIONS = ("fp32", "fp16", "int4")
# fp32 packages pass when max |og - torch| <= FP32_RTOL * max |torch logit| (see check_package).
FP32_RTOL = 1e-4
DEFAULT_STEPS = 32
CHECK_QUESTION = "Describe this image."
CHECK_IMAGE_SIZE = (336, 336)
CHECK_CROPS = 1  # a 336x336 image at 1 crop: 313 image tokens (global view + one crop), cheap on a 4.2B model


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the built-in request ----------------------------------------------------------------------------------------

def check_image_png() -> bytes:
    """The built-in image as PNG bytes: 336x336, a gradient, a few coloured shapes and a line of text, drawn with
    Pillow (nothing shipped). Deterministic for a given Pillow (its text rasteriser); both engines get the very
    same preprocessed pixels anyway."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = CHECK_IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([200 + x * 55 // (width - 1), 220 + y * 35 // (height - 1),
                           np.full_like(x, 235)], axis=-1).astype(np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    draw.rectangle((24, 28, 144, 128), fill=(214, 39, 40), outline=(90, 10, 10), width=3)
    draw.ellipse((176, 36, 312, 150), fill=(31, 119, 180), outline=(10, 40, 90), width=3)
    draw.polygon([(60, 300), (150, 170), (240, 300)], fill=(44, 160, 44), outline=(10, 70, 10))
    draw.line((250, 180, 320, 310), fill=(255, 191, 0), width=6)
    try:
        font = ImageFont.load_default(size=22)
    except (TypeError, ValueError, OSError, ImportError):  # no FreeType: Pillow's bitmap font
        font = ImageFont.load_default()
    draw.text((20, 306), "phi3v-ort export check", fill=(20, 20, 20), font=font)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def check_image():
    """The built-in image as the runtime's ImageInput (decoded by images.decode, as any loaded PNG)."""
    from phi3v_ort.inputs.images import ImageInput, decode

    started = time.perf_counter()
    raw = check_image_png()
    image, pass_through = decode(raw, "built-in check image")
    return ImageInput(source="built-in check image", data=raw, image=image, pass_through=pass_through,
                      load_s=time.perf_counter() - started)


# -- the package's precision -------------------------------------------------------------------------------------

def package_precision(package_dir: str | Path) -> str:
    """"int4" when the decoder ONNX holds MatMulNBits nodes, else "fp16" or "fp32" by the dtype of its
    `inputs_embeds` input. (The exporter knows the variant it wrote: it should pass `precision=` instead.)"""
    import onnx

    from phi3v_ort.package.loading import read_package
    from phi3v_ort.package.onnx_header import read_input_spec

    info = read_package(package_dir)
    decoder = info.path / info.files.decoder
    model = onnx.load(str(decoder), load_external_data=False)

    def op_types(graph):
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from op_types(attr.g)
                for sub in attr.graphs:
                    yield from op_types(sub)

    if any(op == "MatMulNBits" for op in op_types(model.graph)):
        return "int4"
    del model
    dtype = read_input_spec(decoder, "inputs_embeds").dtype
    if dtype == np.float16:
        return "fp16"
    if dtype == np.float32:
        return "fp32"
    raise ValueError(f"{decoder.name}: unexpected inputs_embeds dtype {np.dtype(dtype).name}")


def _package_eos_ids(package_dir: Path) -> tuple[int, ...]:
    """The end token(s) og masks under min_length: genai_config.json's model.eos_token_id (an int or a list)."""
    value = json.loads((package_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["eos_token_id"]
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


# -- the report --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckReport:
    """The outcome of `check_package`. `passed`: True/False for fp32 packages; None ("report only") for fp16 and
    int4 ones unless something failed outright (an engine could not run, or a logit is NaN/inf: False)."""

    package: str
    checkpoint: str
    adapter: str | None
    precision: str
    steps: int  # decode steps compared (asked for; fewer only if og stopped early, which it should not)
    prompt_tokens: int
    image_tokens: int
    image_size: tuple[int, int]
    agreement: int  # steps where og's token is the reference's argmax (end tokens masked, as og chose)
    first_disagreement: int | None  # the first such step that differs, None when all agree
    max_abs_diff: float  # max |og logit - torch logit| over [steps, vocab]
    max_ref_logit: float  # max |torch logit| over the same rows
    relative_diff: float  # max_abs_diff / max_ref_logit
    tolerance: float | None  # the relative_diff a pass allows (fp32), None for report-only precisions
    finite: bool  # every logit of both engines is finite
    passed: bool | None
    og_tokens: tuple[int, ...]
    reference_tokens: tuple[int, ...]  # the reference's argmax at each step (end tokens masked)
    og_load_s: float
    og_run_s: float
    torch_load_s: float
    torch_run_s: float
    error: str | None = None  # why an engine could not run (then passed is False and the numbers are empty)

    @property
    def top1_agreement(self) -> float:
        return self.agreement / self.steps if self.steps else 0.0

    @property
    def og_s(self) -> float:
        return self.og_load_s + self.og_run_s

    @property
    def torch_s(self) -> float:
        return self.torch_load_s + self.torch_run_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["og_tokens"] = list(self.og_tokens)
        d["reference_tokens"] = list(self.reference_tokens)
        d.update(top1_agreement=self.top1_agreement, og_s=self.og_s, torch_s=self.torch_s)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def verdict(self) -> str:
        if self.error is not None:
            return f"FAILED ({self.error})"
        if not self.finite:
            return "FAILED (NaN or infinite logits)"
        if self.passed is None:
            return f"report only ({self.precision} weights: no pass threshold)"
        if self.passed:
            return "passed"
        return f"FAILED (relative diff {self.relative_diff:.2g} > {self.tolerance:.0e})"

    def summary(self) -> str:
        """One line for the CLI."""
        w, h = self.image_size
        reference = "torch reference" + (" + adapter" if self.adapter else "")
        head = f"check: {self.precision} package vs {reference} on a built-in {w}x{h} image"
        if self.error is not None and not self.og_tokens:
            return f"{head}: {self.verdict()}"
        return (f"{head} ({self.image_tokens} image tokens, {self.steps} steps): top-1 agreement "
                f"{self.agreement}/{self.steps}, max |diff| {self.max_abs_diff:.2g} ({self.relative_diff:.2g} of "
                f"the largest logit): {self.verdict()}")


# -- the check ---------------------------------------------------------------------------------------------------

@dataclass
class _OgRun:
    input_ids: np.ndarray  # int32 [1, S], -k at image k's positions
    pixel_values: np.ndarray | None
    image_sizes: np.ndarray | None
    image_tokens: int
    tokens: list[int]
    logits: np.ndarray  # float32 [steps, vocab]: the logits each token was picked from
    load_s: float
    run_s: float


def _run_og(package_dir: Path, steps: int, threads: int | None, eos: tuple[int, ...], log) -> _OgRun:
    """The package on og's CPU provider: the built-in request, `steps` greedy tokens, never stopping early."""
    import onnxruntime_genai as og

    from phi3v_ort.engine.generation import prepare
    from phi3v_ort.engine.model import load_model

    started = time.perf_counter()
    loaded = load_model(package_dir, device="cpu", threads=threads)
    prepared = prepare(loaded, CHECK_QUESTION, [check_image()], crops=CHECK_CROPS)
    load_s = time.perf_counter() - started
    prompt_len = prepared.prompt_tokens
    log(f"check: og loaded the package in {load_s:.1f} s; {prompt_len} prompt tokens "
        f"({sum(prepared.image_tokens)} image tokens), {steps} greedy steps")

    started = time.perf_counter()
    params = og.GeneratorParams(loaded.og_model)
    # min_length = max_length: og masks the end token(s) while choosing, so it runs exactly `steps` tokens.
    params.set_search_options(max_length=prompt_len + steps, min_length=prompt_len + steps, do_sample=False,
                              top_k=1, repetition_penalty=1.0)
    generator = og.Generator(loaded.og_model, params)
    tokens: list[int] = []
    rows: list[np.ndarray] = []
    try:
        generator.set_inputs(prepared.to_og())  # og 0.18 runs the prefill here: the first logits are ready
        while len(tokens) < steps and not generator.is_done():
            rows.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1).copy())
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
    finally:
        del generator, params
    run_s = time.perf_counter() - started
    if len(tokens) < steps:
        log(f"check: warning: og stopped after {len(tokens)} of {steps} steps despite min_length")
    logits = np.stack(rows) if rows else np.zeros((0, loaded.info.vocab_size), np.float32)
    masked = logits.copy()
    masked[:, list(eos)] = -np.inf
    own = [int(t) for t in masked.argmax(-1)] if len(masked) else []
    if own != tokens:
        i = next(i for i, (a, b) in enumerate(zip(own, tokens)) if a != b)
        log(f"check: warning: og picked token {tokens[i]} at step {i} but its logits' argmax is {own[i]}")
    run = _OgRun(prepared.input_ids, prepared.pixel_values, prepared.image_sizes, sum(prepared.image_tokens),
                 tokens, logits, load_s, run_s)
    del loaded, prepared
    return run


def _run_torch(checkpoint_dir: Path, adapter_dir: Path | None, run: _OgRun, threads: int | None,
               log) -> tuple[np.ndarray, float, float]:
    """The reference's logits for og's steps: one teacher-forced forward over prompt + og's tokens but the last."""
    import torch

    from phi3v_ort.reference.model import Phi3VisionReference

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            started = time.perf_counter()
            reference = Phi3VisionReference.from_checkpoint(checkpoint_dir, dtype=torch.float32)
            if adapter_dir is not None:
                reference.apply_adapter(adapter_dir)
            load_s = time.perf_counter() - started
            log(f"check: torch loaded the checkpoint in {load_s:.1f} s")

            started = time.perf_counter()
            n = len(run.tokens)
            ids = np.concatenate([run.input_ids.reshape(-1).astype(np.int64),
                                  np.asarray(run.tokens[:n - 1], dtype=np.int64)])[None, :]
            features = None
            if run.pixel_values is not None:
                features = reference.image_features(*_used_crops(run.pixel_values, run.image_sizes))
            embeds = reference.embed(ids, features)
            del features
            out = reference.decoder(inputs_embeds=embeds, use_cache=False, logits_to_keep=n)
            logits = out.logits[0].float().numpy().copy()
            del out, embeds, reference
            run_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
        release_memory()
    return logits, load_s, run_s


def _used_crops(pixel_values: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values without the trailing all-zero crop slots no image uses (the release's vision model takes 17
    slots whatever the crop budget; at 1 crop only 2 are used: the global view and one crop). The reference's
    vision runs CLIP on every slot it is given, each crop on its own, and lays out only the used ones
    (reference.layout_index), so its features are the same with 2 slots as with 17, at an eighth of the cost."""
    from phi3v_ort.package import contract

    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    used = 1 + int(max((h // contract.CROP_SIZE) * (w // contract.CROP_SIZE) for h, w in sizes))
    return pixel_values[:, :min(used, pixel_values.shape[1])], sizes


def check_package(package_dir: str | Path, checkpoint_dir: str | Path, *, adapter_dir: str | Path | None = None,
                  precision: str | None = None, steps: int = DEFAULT_STEPS, threads: int | None = None,
                  log: Callable[[str], None] = print_to_stderr) -> CheckReport:
    """Validate an exported package against the torch reference on the same weights (see the module docstring).

    `precision` ("fp32", "fp16" or "int4"): what the exporter wrote; None reads it from the package
    (`package_precision`). `threads`: intra-op threads for og and torch (None: their defaults).

    Verdict:
    - fp32: passed iff max |og - torch| <= 1e-4 x max |torch logit|. Relative, because the scale of the logits
      depends on the weights: ~0.5 on a synthetic (random) model, ~30 on the real one; an absolute bound would be
      too tight for one or blind for the other. Both engines run fp32 and differ only by summation order (MLAS vs
      torch GEMMs, fused attention/rotary/norm kernels): tests/reference/test_torch_parity.py measures <= 1.2e-6 relative,
      so 1e-4 leaves ~100x headroom. What it catches, measured on the tiny fp32 package: Gaussian noise of 1% of
      the weight's std on ONE decoder MLP matrix moves the logits by 6e-4 relative (10%: 5e-3); 0.1% (6e-5) is
      below it. tests/reference/test_torch_parity.py: dropping LongRoPE's magnitude scale moves them by 2-3e-4.
    - fp16, int4: report only (passed None): their rounding is no bug, and how far it moves the logits depends on
      the model; agreement and the difference are reported for a person to judge.
    - any precision: a NaN/inf logit in either engine, or an engine that cannot run, is a failure (passed False,
      `error` says which engine and why).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    package_dir = Path(package_dir).expanduser()
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    adapter = Path(adapter_dir).expanduser() if adapter_dir is not None else None
    if precision is None:
        precision = package_precision(package_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tolerance = FP32_RTOL if precision == "fp32" else None
    base = {"package": str(package_dir), "checkpoint": str(checkpoint_dir),
            "adapter": str(adapter) if adapter is not None else None, "precision": precision,
            "image_size": CHECK_IMAGE_SIZE, "tolerance": tolerance}

    def failed(error: str, run: _OgRun | None = None, **timings) -> CheckReport:
        log(f"check: {error}")
        return CheckReport(**base, steps=steps, prompt_tokens=run.input_ids.shape[-1] if run else 0,
                           image_tokens=run.image_tokens if run else 0, agreement=0, first_disagreement=None,
                           max_abs_diff=math.nan, max_ref_logit=math.nan, relative_diff=math.nan, finite=False,
                           passed=False, og_tokens=tuple(run.tokens) if run else (), reference_tokens=(),
                           **{"og_load_s": 0.0, "og_run_s": 0.0, "torch_load_s": 0.0, "torch_run_s": 0.0,
                              **timings}, error=error)

    eos = _package_eos_ids(package_dir)
    run: _OgRun | None = None
    error = ""
    try:
        run = _run_og(package_dir, steps, threads, eos, log)
    except Exception as exc:  # noqa: BLE001 - a package og cannot run is the check's own verdict
        error = f"og could not run the package: {_describe(exc)}"
    # Outside the except block (whose traceback holds _run_og's frame): the og model is gone before torch loads,
    # as a full-size model does not fit twice.
    release_memory()
    if run is None:
        return failed(error)
    log(f"check: og ran {len(run.tokens)} steps in {run.run_s:.1f} s")
    if not run.tokens:
        return failed("og generated no token", run, og_load_s=run.load_s, og_run_s=run.run_s)

    try:
        ref, torch_load_s, torch_run_s = _run_torch(checkpoint_dir, adapter, run, threads, log)
    except Exception as exc:  # noqa: BLE001 - reported, as an og failure is
        return failed(f"the torch reference could not run: {_describe(exc)}", run, og_load_s=run.load_s,
                      og_run_s=run.run_s)
    log(f"check: torch ran the teacher-forced forward in {torch_run_s:.1f} s")

    ours = run.logits
    if ref.shape != ours.shape:
        return failed(f"the engines' logits differ in shape: og {ours.shape}, torch {ref.shape}", run,
                      og_load_s=run.load_s, og_run_s=run.run_s, torch_load_s=torch_load_s, torch_run_s=torch_run_s)
    return _verdict(run, ref, eos, tolerance, base, torch_load_s, torch_run_s)  # the caller prints its summary()



def _verdict(run: _OgRun, ref: np.ndarray, eos, tolerance: float | None, base: dict, torch_load_s: float,
             torch_run_s: float) -> CheckReport:
    """og's logits against the reference's: greedy agreement (end tokens masked on the reference side, as og stops
    there), the largest difference relative to the largest reference logit, and the verdict for `tolerance`."""
    ours = run.logits
    finite = bool(np.isfinite(ours).all() and np.isfinite(ref).all())
    masked = ref.copy()
    masked[:, list(eos)] = -np.inf
    ref_tokens = tuple(int(t) for t in masked.argmax(-1))
    same = [a == b for a, b in zip(run.tokens, ref_tokens)]
    diff = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if not finite:
        passed: bool | None = False
    elif tolerance is None:
        passed = None
    else:
        passed = bool(relative <= tolerance)
    report = CheckReport(**base, steps=len(run.tokens), prompt_tokens=int(run.input_ids.shape[-1]),
                         image_tokens=run.image_tokens, agreement=sum(same),
                         first_disagreement=next((i for i, s in enumerate(same) if not s), None),
                         max_abs_diff=diff, max_ref_logit=scale, relative_diff=relative, finite=finite,
                         passed=passed, og_tokens=tuple(run.tokens), reference_tokens=ref_tokens,
                         og_load_s=run.load_s, og_run_s=run.run_s, torch_load_s=torch_load_s,
                         torch_run_s=torch_run_s)
    return report


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
