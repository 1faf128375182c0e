"""phi3v-ort: Phi-3-vision and Phi-3.5-vision on ONNX Runtime GenAI.

    import phi3v_ort
    model = phi3v_ort.load("phi-3-vision")      # a catalog name or a package folder
    print(model.ask("Could you please introduce this stock to me?", images=["examples/chart.png"]).text)

See `help(phi3v_ort.load)`, `help(phi3v_ort.Model)` and `help(phi3v_ort.Settings)`.
"""

__version__ = "0.1.0"

from phi3v_ort.api import Answer, AnswerStream, Chat, Model, Settings, load  # noqa: E402
from phi3v_ort.errors import ConstraintError, ContextTooLong, ImageError, Phi3vError, SettingError  # noqa: E402

__all__ = ["load", "Model", "Chat", "Answer", "AnswerStream", "Settings", "Phi3vError", "ContextTooLong",
           "ImageError", "SettingError", "ConstraintError", "__version__"]
