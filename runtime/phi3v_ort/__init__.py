"""phi3v-ort: Phi-3-vision and Phi-3.5-vision on ONNX Runtime GenAI.

    import phi3v_ort
    model = phi3v_ort.load("phi-3-vision")      # a catalog name or a package folder
    print(model.ask("Could you please introduce this stock to me?", images=["examples/chart.png"]).text)

See `help(phi3v_ort.load)`, `help(phi3v_ort.Model)` and `help(phi3v_ort.Settings)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phi3v_ort.errors import ConstraintError, ContextTooLong, ImageError, Phi3vError, SettingError

__version__ = "0.1.0"

__all__ = ["load", "Model", "Chat", "Answer", "AnswerStream", "Settings", "Phi3vError", "ContextTooLong",
           "ImageError", "SettingError", "ConstraintError", "__version__"]

_API = ("load", "Model", "Chat", "Answer", "AnswerStream", "Settings")

if TYPE_CHECKING:
    from phi3v_ort.api import Answer, AnswerStream, Chat, Model, Settings, load


def __getattr__(name: str):
    """The API is imported on first use: every `phi3v-ort` command imports this package, and a warm `run`
    (a running server answers) waits for every import it does not need."""
    if name in _API:
        from phi3v_ort import api

        return getattr(api, name)
    raise AttributeError(f"module 'phi3v_ort' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
