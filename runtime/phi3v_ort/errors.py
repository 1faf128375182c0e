"""The exceptions of expected failures: each message is a single sentence meant for the user.

`Phi3vError` is the one type to catch; its subclasses are the failures a caller would branch on (a prompt that
does not fit, a bad image, a bad setting, an output constraint that cannot be compiled). The CLI shows any of them
as one `Error:` line, the server as a 400, the Python API raises them as they are.
"""


class Phi3vError(Exception):
    """Bad input, a missing model, no GPU, a prompt that cannot fit: said in one sentence, never a traceback."""


class ContextTooLong(Phi3vError):
    """The prompt (or the conversation, or one turn) needs more tokens than the model's context holds.

    `requested`: the tokens asked for (prompt + answer budget); `allowed`: the context length."""

    def __init__(self, message: str, requested: int, allowed: int):
        super().__init__(message)
        self.requested, self.allowed = requested, allowed


class ImageError(Phi3vError):
    """An image that cannot be read, decoded or used (missing, empty, too large, not an image, a refused URL)."""


class SettingError(Phi3vError):
    """A generation or input setting out of range or of the wrong type (max_new_tokens, temperature, crops, ...)."""


class ConstraintError(Phi3vError):
    """An output constraint (JSON schema, regex, grammar) that is malformed or that og cannot compile."""


def install_hint(extra: str) -> str:
    """The one way a message says how to add an optional extra. It holds for phi3v-ort installed from a clone
    (`pip install -e .`), from a built wheel or from an index alike: pip finds phi3v-ort installed and adds only the
    extra's dependencies (checked with `pip install --dry-run --no-index`)."""
    return f"pip install 'phi3v-ort[{extra}]'"


def missing_extra(what: str, extra: str, module: str | None) -> Phi3vError:
    """`what` cannot run because a module of an optional extra is not installed: one sentence with the fix."""
    return Phi3vError(f"{what} needs the {extra} extra ({module or 'a module'} is missing): {install_hint(extra)}")
