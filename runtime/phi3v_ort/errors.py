"""The one exception type for expected failures: its message is a single sentence meant for the user."""


class Phi3vError(Exception):
    """Bad input, a missing model, no GPU, a prompt that cannot fit: said in one sentence, never a traceback."""
