"""Fetch a published build from the Hugging Face hub, check what arrived, find what is already on disk.

huggingface_hub does the work (progress bars, retries, the shared cache); this module adds the catalog lookup,
a check of the hub's live file list before downloading, a check of the folder after it (a folder that is not
complete is reported and fetched again, never loaded), and one sentence per failure.

Resuming, as huggingface_hub 2.4 does it (checked against the loopback hub in tests/package/fake_hub.py): a connection
dropped mid-file is retried within the same call from the last 10 MiB written; files already complete are never
downloaded again; a file cut off by Ctrl-C or a failed call restarts from zero on the next fetch (the client
deletes its per-attempt `.incomplete` file), and nothing half-written ever sits under the final name.
HF_ENDPOINT and HF_HUB_CACHE are read when a fetch runs, not only when huggingface_hub is imported.

Names: `-m NAME` is a catalog model (phi-3-vision, optionally :cpu-int4) or, failing that, a local package of the
models folder (package/local.py); catalog names keep priority. `fetch --name NAME` makes a fetched build a local
package.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from phi3v_ort.package import local
from phi3v_ort.package.catalog import Variant, input_files
from phi3v_ort.errors import Phi3vError
from phi3v_ort.package.loading import read_package

MIN_DATA_BYTES = 1024


@dataclass(frozen=True)
class LocalCopy:
    variant: Variant
    path: Path | None
    complete: bool
    size_bytes: int
    problem: str | None  # why it is not complete (None when complete or absent)


def endpoint() -> str | None:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once at import; a fetch honours the current value)."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_cache(cache_dir: str | None = None) -> str:
    """The hub cache to use: the argument, else HF_HUB_CACHE / HF_HOME as they are now, else the client's default."""
    if cache_dir:
        return cache_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def check_folder(path: Path, variant: Variant, expected_sizes: dict[str, int] | None = None) -> str | None:
    """None when the folder is a complete copy of the variant; else one sentence saying what is wrong."""
    if not path.is_dir():
        return f"{path} does not exist"
    try:
        info = read_package(path)
    except Phi3vError as exc:
        return str(exc)
    models = (info.files.vision, info.files.embedding, info.files.decoder)
    needed = set(variant.files) | set(models)
    needed |= {f + ".data" for f in models if f + ".data" in variant.files or (path / (f + ".data")).exists()}
    for name in sorted(needed):
        f = path / name
        if not f.is_file():
            return f"{path} is incomplete: {name} is missing"
        size = f.stat().st_size
        if expected_sizes and name in expected_sizes and expected_sizes[name] is not None:
            if size != expected_sizes[name]:
                return f"{path} is incomplete: {name} has {size:,} of {expected_sizes[name]:,} bytes"
        elif name.endswith(".data") and size < MIN_DATA_BYTES:
            return f"{path} is incomplete: {name} is only {size} bytes"
    return None


def locate(variant: Variant, revision: str | None = None, cache_dir: str | None = None,
           local_dir: str | None = None) -> LocalCopy:
    """What of `variant` is already on this machine (the hub cache, or `local_dir`), without the network."""
    check_revision(revision)
    if local_dir:
        path = Path(local_dir).expanduser() / variant.folder
    else:
        # The hub cache's documented layout: models--ORG--NAME/refs/REVISION holds the commit of snapshots/COMMIT/.
        repo_dir = Path(hub_cache(cache_dir)) / f"models--{variant.repo.replace('/', '--')}"
        ref = repo_dir / "refs" / (revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else (revision or "")
        path = repo_dir / "snapshots" / commit / variant.folder
    if not path.exists():
        return LocalCopy(variant, None, False, 0, None)
    problem = check_folder(path, variant)
    return LocalCopy(variant, path, problem is None, local.folder_size(path), problem)


MAX_REVISION = 255  # a branch, a tag or a commit: one path component in the hub cache (refs/REVISION)


def check_revision(revision: str | None) -> None:
    """A revision the hub cache can hold as a file name: 1-255 characters, no control characters, no `..` and no
    leading `/` (it becomes a path under the cache's refs/)."""
    if revision is None:
        return
    if not revision.strip() or len(revision) > MAX_REVISION:
        raise Phi3vError(f"--revision must be a branch, a tag or a commit of 1 to {MAX_REVISION} characters, got "
                         f"{len(revision)} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in revision) or ".." in revision or revision.startswith("/"):
        raise Phi3vError(f"--revision {revision[:80]!r} is not a branch, a tag or a commit name")


def hub_listing(variant: Variant, revision: str | None = None) -> dict[str, int | None]:
    """The variant folder's files on the hub and their sizes, checked to hold what the catalog expects."""
    from huggingface_hub import HfApi

    check_revision(revision)
    api = HfApi(endpoint=endpoint())
    try:
        info = api.model_info(variant.repo, revision=revision, files_metadata=True)
    except BaseException as exc:
        raise hub_error(exc, variant, revision) from None
    prefix = variant.folder + "/"
    listed = {s.rfilename[len(prefix):]: s.size for s in info.siblings or [] if s.rfilename.startswith(prefix)}
    if not listed:
        raise Phi3vError(f"{variant.repo} has no folder {variant.folder} (at revision {revision or 'main'}): "
                         "it may have been moved or removed from the hub")
    missing = [f for f in variant.files if f not in listed]
    if missing:
        raise Phi3vError(f"the hub's copy of {variant.repo}/{variant.folder} lacks {missing[0]}: "
                         "it cannot be used as a Phi-3-vision package")
    return listed


def fetch(variant: Variant, revision: str | None = None, cache_dir: str | None = None,
          local_dir: str | None = None, only: tuple[str, ...] | None = None) -> Path:
    """Download the variant's folder (resuming anything partial) and return it once it checks complete.
    `only`: just these files of it (fetch_inputs), checked to have arrived whole."""
    from huggingface_hub import snapshot_download

    listed = hub_listing(variant, revision)
    wanted = listed if only is None else {name: listed.get(name) for name in only}
    target = Path(local_dir).expanduser() if local_dir else Path(hub_cache(cache_dir))
    need = sum(size or 0 for size in wanted.values())
    _check_disk(target, need, variant)
    what = variant.label if only is None else f"the tokenizer and configs of {variant.label}"
    size = f"{need / 2**30:.2f} GB" if only is None else f"{need / 2**20:.1f} MB"
    print(f"Fetching {what} from {variant.repo} ({variant.folder}, {size}) into {target}", file=sys.stderr,
          flush=True)
    patterns = [f"{variant.folder}/*"] if only is None else [f"{variant.folder}/{name}" for name in only]
    try:
        root = snapshot_download(variant.repo, revision=revision, allow_patterns=patterns,
                                 cache_dir=None if local_dir else hub_cache(cache_dir), local_dir=local_dir,
                                 endpoint=endpoint())
    except BaseException as exc:
        raise hub_error(exc, variant, revision, target) from None
    path = Path(root) / variant.folder
    problem = check_folder(path, variant, listed) if only is None else _check_files(path, wanted)
    if problem:
        raise Phi3vError(f"the download of {variant.label} is not complete ({problem}); run the same fetch again "
                         "to resume it")
    return path


def _check_files(path: Path, sizes: dict[str, int | None]) -> str | None:
    for name, size in sorted(sizes.items()):
        f = path / name
        if not f.is_file():
            return f"{path} is incomplete: {name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{path} is incomplete: {name} has {f.stat().st_size:,} of {size:,} bytes"
    return None


def fetch_inputs(variant: Variant, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A folder holding what the runtime's input pipeline reads of the variant (configs, tokenizer, the vision
    model's graph: megabytes, where the whole package is gigabytes): the copy on disk, whole or not, when it holds
    them, else only those files fetched (`prepare` tokenizes with them; `run` fetches the rest later)."""
    found = locate(variant, revision, cache_dir)
    if found.path is not None and inputs_problem(found.path) is None:
        return found.path
    return fetch(variant, revision, cache_dir, only=input_files(variant))


def inputs_problem(path: Path) -> str | None:
    """None when the folder holds what the input pipeline reads (read_package(inputs_only=True)), else why not."""
    try:
        read_package(path, inputs_only=True)
    except Phi3vError as exc:
        return str(exc)
    return None


def ensure_named(variant: Variant, name: str, revision: str | None = None) -> Path:
    """The variant as the local package `name` (models folder/NAME): the complete copy already there, or a fetch
    into a hidden staging folder beside it (resumed by the same command, like any --dir fetch), moved into place
    once complete. A folder of that name holding anything else is refused, never overwritten."""
    target = local.package_path(name)
    if target.exists():
        problem = check_folder(target, variant)
        if problem is None:
            return target
        raise Phi3vError(f"the local package {name!r} ({target}) is not a complete copy of {variant.label} "
                         f"({problem}): choose another --name, or remove that folder")
    staging = target.parent / f".{name}.fetching"
    path = ensure(variant, revision, local_dir=str(staging))
    path.rename(target)  # the same file system: the package appears whole or not at all
    shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure(variant: Variant, revision: str | None = None, cache_dir: str | None = None,
           local_dir: str | None = None) -> Path:
    """A complete local copy of the variant: the one on disk, or a fresh fetch (with progress on stderr)."""
    local = locate(variant, revision, cache_dir, local_dir)
    if local.complete and local.path is not None:
        return local.path
    if local.problem:
        print(f"The copy on disk is not usable ({local.problem}); fetching it again.", file=sys.stderr, flush=True)
    return fetch(variant, revision, cache_dir, local_dir)


def _check_disk(target: Path, need: int, variant: Variant) -> None:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise Phi3vError(f"not enough disk space for {variant.label}: it needs {need / 2**30:.2f} GB and "
                         f"{probe} has {free / 2**30:.2f} GB free")


def hub_error(exc: BaseException, variant: Variant, revision: str | None, target: Path | None = None) -> BaseException:
    """One sentence for each way a hub call fails; KeyboardInterrupt passes through untouched."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    from huggingface_hub import errors as hf

    where = f"{variant.repo} ({variant.folder})"
    copy = (f"copy the package from a machine that has it (there: `phi3v-ort fetch -m {variant.model} --variant "
            f"{variant.name} --dir DIR`) and pass its folder with --model-dir")
    offline_hint = ("to reach the hub another way, set HTTPS_PROXY (a proxy) or HF_ENDPOINT (a mirror of "
                    f"huggingface.co), with HF_TOKEN if it asks for a token, and run the same command again; or {copy}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)):
        if os.environ.get("HF_HUB_OFFLINE"):
            return Phi3vError(f"no complete copy of {variant.label} is on this machine and HF_HUB_OFFLINE is set "
                              "(offline): unset it to fetch the model (with HTTPS_PROXY, HF_ENDPOINT or HF_TOKEN if "
                              f"the hub needs them), or {copy}")
        return Phi3vError(f"no complete copy of {variant.label} is on this machine and the hub cannot be reached "
                          f"(offline): {offline_hint}")
    if isinstance(exc, hf.GatedRepoError) or status in (401, 403) and not isinstance(exc, hf.RepositoryNotFoundError):
        return Phi3vError(f"the hub refused access to {where} (HTTP {status or 401}): set HF_TOKEN to a token that "
                          "can read it")
    if isinstance(exc, hf.RepositoryNotFoundError):
        if status == 401:
            return Phi3vError(f"the hub did not find {variant.repo} or refused access to it (HTTP 401): check the "
                              "name, or set HF_TOKEN if it is private")
        return Phi3vError(f"{variant.repo} was not found on the hub (HTTP 404)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return Phi3vError(f"{variant.repo} has no revision {revision!r}")
    if isinstance(exc, hf.EntryNotFoundError):
        return Phi3vError(f"a file of {where} is missing on the hub (HTTP 404): the hub's copy is incomplete")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return Phi3vError(f"the disk filled up while downloading {variant.label} into {target}: free some space "
                          "and run the same fetch again to resume")
    if isinstance(exc, hf.HfHubHTTPError):
        return Phi3vError(f"the hub answered HTTP {status} for {where}: {str(exc).splitlines()[0]}")
    if _is_network_error(exc):
        return Phi3vError(f"cannot reach the hub ({endpoint() or 'https://huggingface.co'}) to fetch {where}: "
                          f"{offline_hint}")
    if isinstance(exc, OSError):
        return Phi3vError(f"fetching {where} failed: {exc.strerror or exc}")
    return exc


def _is_network_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "ReadError",
                    "NetworkError", "TimeoutException", "ConnectionError", "ConnectionRefusedError",
                    "ConnectionResetError", "TimeoutError", "gaierror"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def model_target(model: str | None, model_dir: str | None, device: str) -> Path | Variant:
    """What the options name, without touching the network: a folder (--model-dir, or a folder given by name), the
    catalog variant of a name from -m / PHI3V_ORT_MODEL / the default (a name may pin a variant:
    `phi-3-vision:cpu-int4`), or else a local package of the models folder by its name."""
    from phi3v_ort.package.catalog import DEFAULT_MODEL, MODEL_ENV, MODELS, select
    from phi3v_ort.package.device import resolve_device

    if model_dir is not None and not model_dir.strip():  # '' is a mistake (an unset variable), not "the default"
        raise Phi3vError("--model-dir is empty: give the package's folder")
    if model is not None and not model.strip():
        raise Phi3vError("-m/--model is empty: give a model name (phi3v-ort models lists them) or a folder")
    if model and model_dir:
        raise Phi3vError("give either -m/--model or --model-dir, not both")
    if model_dir:
        return Path(model_dir).expanduser()
    name = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if Path(name).expanduser().is_dir() or "/" in name or os.sep in name:
        return Path(name).expanduser()  # a folder, given by name (read_package says if it is missing)
    if name.partition(":")[0] in MODELS:  # catalog names keep priority over local packages
        return select(name, None, resolve_device(device))
    found = local.find_local(name)
    if found is None:
        raise local.unknown_model(name)
    return found


def model_names(model: str | None, model_dir: str | None, device: str) -> tuple[str, ...]:
    """The names the model the options choose answers to, its own first (what a server shows as its id): a catalog
    name as given, then its variant's label (`phi-3-vision`, `phi-3-vision:cpu-int4`); a local package's name
    (also when given as its folder); else the folder's own name. Never touches the network."""
    target = model_target(model, model_dir, device)
    if isinstance(target, Path):
        return (local.local_name(target) or target.expanduser().resolve().name,)
    from phi3v_ort.package.catalog import MODEL_ENV

    given = model or os.environ.get(MODEL_ENV) or target.model
    return tuple(dict.fromkeys((given, target.label)))


def resolve_model_dir(model: str | None, model_dir: str | None, device: str) -> Path:
    """The folder to load: --model-dir as given, else a catalog name (or folder, or local package) from -m /
    PHI3V_ORT_MODEL / the default, found on disk or fetched on first use."""
    target = model_target(model, model_dir, device)
    return target if isinstance(target, Path) else ensure(target)


def resolve_inputs_dir(model: str | None, model_dir: str | None, device: str) -> Path:
    """As resolve_model_dir, for what needs only the input pipeline (`prepare`): a catalog model not on disk gets
    its tokenizer and configs fetched, not the whole package."""
    target = model_target(model, model_dir, device)
    return target if isinstance(target, Path) else fetch_inputs(target)
