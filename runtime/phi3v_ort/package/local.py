"""Packages on this machine by name: the models folder, where `export --name`, `fetch --name` and the synthetic
builder (`--name`) put packages, and where `-m NAME` finds them.

The folder is $PHI3V_ORT_MODELS, else phi3v-ort's folder under the user's data folder ($XDG_DATA_HOME/phi3v-ort/
models, else ~/.local/share/phi3v-ort/models, as the XDG base directory spec says). A package's name is its
folder's name there. Catalog names keep priority: a local package cannot take one (`-m phi-3-vision` always means
the published build).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from phi3v_ort.errors import Phi3vError
from phi3v_ort.package.catalog import MODELS
from phi3v_ort.package.loading import read_package

MODELS_ENV = "PHI3V_ORT_MODELS"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHECKPOINT_SUFFIX = ".checkpoint"  # the synthetic builder's transformers checkpoint beside its package


@dataclass(frozen=True)
class LocalPackage:
    """A folder of the models folder: a package when `problem` is None."""

    name: str
    path: Path
    size_bytes: int
    built_for: str | None  # "cuda" or "cpu", from genai_config.json (None when it cannot be read)
    io_dtype: str | None  # "float16" or "float32"
    problem: str | None  # why it is not a usable package

    @property
    def variant(self) -> str:
        """What it is built for, in the words of `info`: `cpu, float32 I/O`."""
        return f"{self.built_for}, {self.io_dtype} I/O" if self.built_for else "unknown"


def data_home() -> Path:
    """phi3v-ort's folder under the user's data folder: $XDG_DATA_HOME/phi3v-ort, else ~/.local/share/phi3v-ort."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(base).expanduser() / "phi3v-ort"


def models_dir() -> Path:
    """The models folder: $PHI3V_ORT_MODELS, else data_home()/models (it may not exist yet)."""
    chosen = os.environ.get(MODELS_ENV)
    return Path(chosen).expanduser() if chosen else data_home() / "models"


def check_name(name: str) -> str:
    """A name a local package may have (letters, digits, `.`, `_`, `-`; not a catalog model's); else one sentence."""
    if not NAME.fullmatch(name) or name.endswith(CHECKPOINT_SUFFIX):
        raise Phi3vError(f"{name!r} cannot name a local package: use letters, digits, '.', '_' and '-' (starting "
                         f"with a letter or digit, not ending in {CHECKPOINT_SUFFIX})")
    if name in MODELS:
        raise Phi3vError(f"{name!r} is a catalog model's name, and -m {name} always means the published build: "
                         "choose another name")
    return name


def package_path(name: str) -> Path:
    """Where the local package `name` lives (or will): models_dir()/name."""
    return models_dir() / check_name(name)


def folder_size(path: Path) -> int:
    """Bytes of the files directly in a folder (a package is flat); 0 when it is absent."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0


def describe(path: Path) -> LocalPackage:
    """A folder of the models folder, read (never loaded): its size, what it is built for, or why it is not usable."""
    try:
        info = read_package(path)
    except Phi3vError as exc:
        return LocalPackage(path.name, path, folder_size(path), None, None, str(exc))
    return LocalPackage(path.name, path, folder_size(path), info.built_for, info.io_dtype, None)


def list_local() -> list[LocalPackage]:
    """Every folder of the models folder, by name (hidden folders, such as a fetch's staging folder, and the
    synthetic builder's checkpoints left out)."""
    root = models_dir()
    if not root.is_dir():
        return []
    return [describe(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(CHECKPOINT_SUFFIX)]


def find_local(name: str) -> Path | None:
    """The folder of the local package `name`, or None when the models folder has no such folder."""
    if not NAME.fullmatch(name):
        return None
    path = models_dir() / name
    return path if path.is_dir() else None


def local_name(path: str | Path) -> str | None:
    """The name `-m` knows a folder by when it is a package of the models folder, else None."""
    folder = Path(path).expanduser().resolve()
    root = models_dir().expanduser().resolve()
    return folder.name if folder.parent == root else None


def unknown_model(name: str) -> Phi3vError:
    """The sentence for a name that is neither a catalog model nor a local package: what both kinds hold."""
    local = [p.name for p in list_local()]
    held = ", ".join(local) if local else "no package yet"
    return Phi3vError(f"unknown model {name!r}: the catalog has {', '.join(MODELS)}; the models folder "
                      f"{models_dir()} (${MODELS_ENV}) holds {held} (or pass --model-dir with a folder)")


def package_target(out: str | None, name: str | None, option: str = "--out") -> Path:
    """The folder a command writes a package into: `option`'s folder as given, or the local package NAME's."""
    if (out is None) == (name is None):
        raise Phi3vError(f"give either {option} DIR or --name NAME (a local package, in {models_dir()})")
    return Path(out) if out is not None else package_path(name)
