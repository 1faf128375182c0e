"""What a `phi3v-ort bench` run will do, decided before anything runs: which engines can run here (and why the others
cannot), and where its results go."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

from phi3v_ort.errors import Phi3vError, install_hint
from phi3v_ort.package.local import data_home


@dataclass(frozen=True)
class EnginePlan:
    engines: tuple[str, ...]  # the engines that will run, in the order asked
    skipped: dict[str, str] = field(default_factory=dict)  # engine -> the sentence saying why it cannot run here
    checkpoint: str | None = None  # the torch engine's transformers checkpoint, when it runs


def torch_problem(model_dir: str, checkpoint: str | None) -> tuple[str | None, str]:
    """(why the torch engine cannot run here or None, the checkpoint it would load)."""
    checkpoint = checkpoint or str(Path(model_dir).resolve()) + ".checkpoint"
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the torch engine needs the build extra ({missing[0]} is missing): {install_hint('build')}", checkpoint
    if not (Path(checkpoint) / "config.json").is_file():
        return (f"the torch engine needs a transformers checkpoint of the same weights and there is none at "
                f"{checkpoint}: scripts/make_synthetic_model.py writes it next to the package (--out DIR gives "
                "DIR.checkpoint); pass --checkpoint DIR"), checkpoint
    return None, checkpoint


def plan_engines(engines: tuple[str, ...], model_dir: str, checkpoint: str | None) -> EnginePlan:
    """The asked engines that can run here; the others are skipped with their reason. Phi3vError when none can."""
    skipped: dict[str, str] = {}
    if "torch" in engines:
        problem, checkpoint = torch_problem(model_dir, checkpoint)
        if problem:
            skipped["torch"] = problem
    runnable = tuple(e for e in engines if e not in skipped)
    if not runnable:
        raise Phi3vError(f"{'; '.join(skipped.values())}; or measure phi3v-ort alone with --engines ort")
    return EnginePlan(runnable, skipped, checkpoint if "torch" in runnable else None)


def default_out(model_dir: str) -> Path:
    """Where a run's results go unless --out says: `bench.*` in a folder of the user's data folder named by the
    package and the start time (never into whatever folder the command was started from, never over an earlier
    run; a folder, so that a package name with a dot cannot become the files' extension)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return data_home() / "bench" / f"{Path(model_dir).resolve().name}-{stamp}" / "bench"
