"""checkpoint folder (+ LoRA adapter) -> a package in the release's layout, then a check against the torch reference.

    export_checkpoint(checkpoint, out, variant="cpu-int4", adapter=None)

Order, chosen for memory (a full-size model must fit 24 GB): read and check every header first (nothing is loaded
for a checkpoint that cannot be exported); the vision tower and token embedding (float32, ~2 GB for the full
model), exported and freed; the decoder staged a shard's worth at a time, then onnxruntime-genai's builder in a
child process; the side files. Everything is written into a staging folder beside `out` and moved into place only
when complete: an existing `out` is never touched unless `overwrite`, and then only replaced at the very end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi3v_ort.package import contract
from phi3v_ort.export.checkpoint import Checkpoint
from phi3v_ort.export.memory import PeakMemory, release_memory
from phi3v_ort.export.variants import INT4_BLOCK_SIZE, VARIANTS, Variant

NAME_STYLES = {"phi-3": contract.PHI3_FILE_NAMES, "phi-3.5": contract.PHI35_FILE_NAMES}


class ExportError(RuntimeError):
    """The export cannot go on; one sentence."""


@dataclass
class ExportResult:
    path: Path
    variant: str
    family: str
    adapter: str | None
    phases_s: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # memory.PeakMemory's figures: the export's process tree (PSS), the machine's used memory, per phase; the check's
    peak_pss_bytes: int | None = None
    peak_system_used_bytes: int | None = None
    phase_peak_pss_bytes: dict[str, int] = field(default_factory=dict)
    check_peak_pss_bytes: int | None = None
    check: object | None = None  # check.CheckReport, when the check ran

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["check"] = self.check.to_dict() if self.check is not None else None
        return d


def _log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def prepare_out(out: Path, overwrite: bool, sources: dict[str, Path | None] | None = None) -> None:
    """Refuse, before any work, an --out the export must not write: the root of the file system, a folder that is,
    contains or lies inside an input (`sources`: the checkpoint, the adapter; `--overwrite` would delete it), a
    non-empty folder without --overwrite, and with --overwrite anything but an earlier package (or an empty
    folder): --overwrite replaces a package, never a folder of the user's own files."""
    if out == out.parent:
        raise ExportError(f"--out {out} is the root of the file system: give a new folder for the package")
    for what, source in (sources or {}).items():
        if source is None:
            continue
        source = source.expanduser().resolve()
        if out == source or source in out.parents or out in source.parents:
            relation = "is" if out == source else "lies inside" if source in out.parents else "contains"
            raise ExportError(f"--out {out} {relation} the {what} folder {source}: give a folder of its own")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out} already exists and is not empty (choose another folder, or pass "
                              f"--overwrite to replace it once the new package is complete)")
        if not is_package_folder(out):
            raise ExportError(f"--out {out} holds files that are not a package (no genai_config.json, or "
                              f"subfolders): --overwrite replaces only an earlier export; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)


def is_package_folder(folder: Path) -> bool:
    """What an export leaves: genai_config.json and other regular files, no subfolders."""
    entries = list(folder.iterdir())
    return (folder / "genai_config.json").is_file() and all(e.is_file() and not e.is_symlink() for e in entries)


def export_checkpoint(checkpoint: str | Path, out: str | Path, variant: str = "cpu-int4",
                      adapter: str | Path | None = None, family: str = "auto", check: bool = True,
                      overwrite: bool = False, threads: int | None = None, log=_log) -> ExportResult:
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v: Variant = VARIANTS[variant]
    out = Path(out).expanduser().resolve()
    prepare_out(out, overwrite, {"checkpoint": Path(checkpoint), "adapter": adapter and Path(adapter)})
    started = time.perf_counter()
    phases: dict[str, float] = {}
    with PeakMemory() as peak:
        ckpt = Checkpoint.open(checkpoint, family)
        lora = None
        if adapter is not None:
            from phi3v_ort.reference.lora import LoraAdapter

            lora = LoraAdapter.open(adapter)
            lora.check_against(ckpt.shapes())
        names = NAME_STYLES[ckpt.family]
        dec = ckpt.decoder_config()
        log(f"{ckpt.path.name}: {ckpt.family}, decoder {dec.num_hidden_layers}x{dec.hidden_size}, "
            f"{len(ckpt.tensors)} tensors ({ckpt.dtype}); variant {v.name}"
            + (f", adapter {Path(adapter).name}" if adapter else ""))
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
        try:
            t = time.perf_counter()
            peak.phase = "vision_and_embedding"
            merged = _export_embeddings(ckpt, adapter, staging, names, v)
            phases["vision_and_embedding"] = time.perf_counter() - t

            built = _export_decoder(ckpt, lora, merged, work, staging, v, names, peak, phases, log)
            shutil.rmtree(work, ignore_errors=True)

            from phi3v_ort.export.metadata import copy_tokenizer, genai_config, processor_config, write_json

            write_json(staging / "genai_config.json", genai_config(built, ckpt, names))
            write_json(staging / "processor_config.json", processor_config())
            copy_tokenizer(ckpt, staging)
            replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        phases["export"] = time.perf_counter() - started
        log(f"exported {out} in {phases['export']:.0f}s")

    report, check_peak = _run_check(out, ckpt, adapter, v, threads, phases, log) if check else (None, None)
    return ExportResult(path=out, variant=v.name, family=ckpt.family, adapter=str(adapter) if adapter else None,
                        phases_s={k: round(s, 2) for k, s in phases.items()},
                        seconds=round(time.perf_counter() - started, 2), peak_pss_bytes=peak.peak_pss,
                        peak_system_used_bytes=peak.peak_system_used, phase_peak_pss_bytes=dict(peak.phases),
                        check_peak_pss_bytes=check_peak, check=report)


def _export_decoder(ckpt: Checkpoint, lora, merged: list[str], work: Path, staging: Path, v: Variant, names, peak,
                    phases: dict, log) -> dict:
    """The decoder: weights staged (the adapter merged), og's model builder, then int4 (or the float model placed)
    into `staging`; each phase timed and its peak memory sampled. Returns the genai_config the builder wrote."""
    t = time.perf_counter()
    from phi3v_ort.export.decoder import finish_decoder, run_builder, stage_decoder

    peak.phase = "decoder_staging"
    log("decoder: staging the weights for onnxruntime-genai's model builder")
    dtype = stage_decoder(ckpt, work / "hf", lora)
    left = sorted(set(lora.unmerged()) - set(merged)) if lora is not None else []
    if left:
        raise ExportError(f"the adapter targets {left[0]}, which the export never saw")
    release_memory()
    phases["decoder_staging"] = time.perf_counter() - t
    t = time.perf_counter()
    peak.phase = "decoder_builder"
    log(f"decoder: running the model builder ({v.builder_precision}, {v.provider}; weights staged as "
        f"{dtype})")
    built, float_decoder = run_builder(work / "hf", v, names.decoder, work)
    phases["decoder_builder"] = time.perf_counter() - t
    if v.precision == "int4":
        log(f"decoder: int4 RTN quantization, block {INT4_BLOCK_SIZE}"
            + (f", accuracy level {v.accuracy_level}" if v.accuracy_level else "") + ", one weight at a time")
    t = time.perf_counter()
    peak.phase = "decoder_quantize" if v.precision == "int4" else "decoder_place"
    finish_decoder(float_decoder, staging, v)
    phases[peak.phase] = time.perf_counter() - t
    peak.phase = None
    return built


def _run_check(out: Path, ckpt: Checkpoint, adapter, v: Variant, threads: int | None, phases: dict, log):
    """The built-in check of the finished package against the torch reference, with its own peak memory."""
    from phi3v_ort.export.check import check_package

    t = time.perf_counter()
    with PeakMemory() as during_check:
        report = check_package(out, ckpt.path, adapter_dir=adapter, precision=v.precision, threads=threads, log=log)
    phases["check"] = time.perf_counter() - t
    return report, during_check.peak_pss


def _export_embeddings(ckpt: Checkpoint, adapter, staging: Path, names, v: Variant) -> list[str]:
    """components.export_embeddings in a child process (see there); returns the adapter targets it merged."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from phi3v_ort.export.components import export_embeddings

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(export_embeddings, str(ckpt.path), ckpt.family, str(adapter) if adapter else None,
                           str(staging), names.vision, names.embedding, v.io_float16).result()


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder into place; the old one is removed only after the new one is there."""
    mask = os.umask(0)
    os.umask(mask)
    new.chmod(0o777 & ~mask)  # mkdtemp made it private: the modes any new folder and file get (the umask's)
    for f in new.iterdir():
        f.chmod(0o666 & ~mask)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
