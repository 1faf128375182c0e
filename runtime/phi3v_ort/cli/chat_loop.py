"""The terminal chat loop behind `phi3v-ort chat`: lines in, streamed answers out, a few slash commands.

Interactive (a terminal): line editing and history through readline, a prompt on stderr, Ctrl-D leaves (on a line
of its own).
Scripted (stdin is not a terminal): one turn per line, no prompt. Answers go to stdout, everything else to stderr.

Images are loaded and prepared for the model when they are attached (`-i` at the start: a bad one ends the
command with one error; `/image` later: one error line), so a question never fails on an image it cannot read.
A turn that fails (context too long, any unexpected error) is one `Error: ...` line, the history is kept and the
chat goes on. Ctrl-C during an answer stops it (the turn keeps what was generated); before the first token it
cancels the question, and its images stay attached for the next one (so do the images of a refused question:
/detach drops them). During the prefill, which og cannot interrupt, Ctrl-C says at once that the question will be
cancelled (prefill_notice.py). `/load FILE` continues a conversation saved with `/save` (engine/saved.py).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from phi3v_ort.engine import guidance
from phi3v_ort.engine.conversation import Conversation
from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.generation import Finished, Notice
from phi3v_ort.engine.saved import read_saved, restore
from phi3v_ort.engine.guidance import outcome
from phi3v_ort.inputs.images import ImageInput, load_image
from phi3v_ort.cli.phase import Phase, reading
from phi3v_ort.cli.prefill_notice import PrefillNotice

HELP = """Commands:
  /image PATH   attach an image (path, URL) to your next question (repeatable)
  /detach       drop the images attached to your next question
  /reset        start over (forget the conversation and its images)
  /stats        the last answer's stats
  /format KIND  the answers' format from the next question on: text, json (any object), schema FILE_OR_JSON,
                regex PATTERN, grammar FILE.lark (a change re-prefills the conversation once)
  /save FILE    save the transcript as JSON (never over an existing file)
  /save! FILE   the same, replacing FILE if it exists
  /load FILE    continue a conversation saved with /save (its images are read again)
  /help         this help
  /quit         leave (or Ctrl-D)
Ctrl-C stops an answer; before the answer starts it cancels the question and keeps its images attached."""
HISTORY = Path(os.environ.get("PHI3V_ORT_HISTORY", Path.home() / ".phi3v_ort_history"))


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return
    try:
        readline.read_history_file(HISTORY)
    except OSError:
        pass
    import atexit

    atexit.register(lambda: _save_history(readline))


def _save_history(readline) -> None:
    try:
        readline.set_history_length(1000)
        readline.write_history_file(HISTORY)
    except OSError:
        pass


def save_transcript(conversation: Conversation, path: str, overwrite: bool = False) -> Path:
    """Write atomically, and only a regular file: a temp file beside it (created exclusively: never through a
    planted symlink), fsync, then rename over it. A failed write never leaves a half-written file where a good one
    was; a device, a FIFO or a symlink to one (`/dev/null`, `/proc/self/fd/1`) is refused, never replaced. A
    symlink to a regular file stays a symlink: its target is replaced (and keeps its permissions)."""
    target = Path(path).expanduser()
    real = _save_target(target, path, overwrite)
    data = (json.dumps(conversation.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(real.stat().st_mode) if real.exists() else 0o666 & ~_umask())
        os.replace(tmp, real)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise Phi3vError(f"cannot save the transcript to {target}: {exc.strerror or exc}") from None
    return target


def _save_target(target: Path, path: str, overwrite: bool) -> Path:
    """The file /save writes (a symlink's target), or one sentence saying why not."""
    if target.is_symlink() and not target.exists():
        raise Phi3vError(f"{target} is a symlink to nothing: give a file name")
    if not target.exists():
        return target
    if not overwrite:
        raise Phi3vError(f"{target} already exists: /save! {path} replaces it")
    try:
        st = os.stat(target)  # through symlinks: /proc/self/fd/1 is the terminal or a pipe
        mode = st.st_mode
        real = Path(os.path.realpath(target))
        if stat.S_ISREG(mode) and (real.stat().st_dev, real.stat().st_ino) != (st.st_dev, st.st_ino):
            mode = 0  # a /proc link to a deleted or unnamed file: no path of its own to replace
    except OSError as exc:
        raise Phi3vError(f"cannot save the transcript to {target}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, a pipe or a socket)"
        raise Phi3vError(f"{target} is {what}: /save! replaces only a regular file")
    return real


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _one_line(exc: BaseException) -> str:
    """An exception as one line: a Phi3vError's own sentence, anything else with its type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, Phi3vError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _prepare(conversation: Conversation, image: ImageInput, phase: Phase | None = None):
    """Check an image the way the model will take it, now rather than at the next question."""
    if phase is not None:
        phase.show("preparing image")
    try:
        return conversation.prepare_image(image)
    except Phi3vError:
        raise
    except Exception as exc:
        raise Phi3vError(f"the model cannot take image {image.source}: {_one_line(exc)}") from None
    finally:
        if phase is not None:
            phase.clear()


def _ask(conversation: Conversation, question: str, attached: list, out: TextIO, err: TextIO,
         phase: Phase | None = None, notice: PrefillNotice | None = None) -> list:
    """One turn; returns the images attached for the next question. Once the turn has started (a token came or
    the conversation recorded it) its images belong to it; a turn that never started leaves them attached.
    `phase`: a phase line (stderr on a terminal) until the first event; og holds the GIL through the prefill, so
    it is a static line, not an animation. `notice`: says at once that a Ctrl-C during the prefill cancels the
    question when the prefill ends."""
    last = conversation.turns[-1] if conversation.turns else None
    generated = False
    phase = phase or Phase(err, enabled=False)
    armed = None
    try:
        phase.show(reading([conversation.pipeline.image_tokens(p) for p in attached]))
        armed = notice.arm() if notice is not None else None
        with closing(conversation.ask(question, attached)) as events:
            for event in events:
                phase.clear()  # the first event ends the wait (a notice, or the answer's first token)
                if notice is not None:
                    notice.disarm(armed)
                    armed = None
                if isinstance(event, Notice):
                    err.write(f"[{event.message}]\n")
                else:
                    generated = True
                    out.write("\n" if isinstance(event, Finished) else event.text)
                out.flush()
                if isinstance(event, Finished):  # a constrained answer that is not complete says so
                    result = outcome(conversation.settings.guidance, event.text, event.stats.finish_reason,
                                     event.stats.generated_tokens)
                    if not result.complete:
                        err.write(f"Error: {result.problem}\n")
        return []
    except KeyboardInterrupt:
        error = None
    except Exception as exc:  # one line, never a traceback that ends the chat
        error = _one_line(exc)
    finally:
        phase.clear()
        if notice is not None:
            notice.disarm(armed)
    if generated or (conversation.turns and conversation.turns[-1] is not last):
        out.write("\n")
        out.flush()
        err.write(f"Error: {error}\n" if error else "[answer stopped]\n")
        return []
    still = f"{len(attached)} image{'' if len(attached) == 1 else 's'} still attached"
    if error:
        err.write(f"Error: {error}" + (f" ({still}; /detach drops them)" if attached else "") + "\n")
    else:
        err.write("\n[question cancelled" + (f"; {still}" if attached else "") + "]\n")
    return attached


def _command(conversation: Conversation, line: str, attached: list, err: TextIO, format_stats,
             phase: Phase | None = None) -> bool:
    """A slash command (it may change `attached` in place); returns False to leave the chat."""
    command, _, arg = line.partition(" ")
    arg = arg.strip()
    if command in ("/quit", "/exit"):
        return False
    if command == "/help":
        err.write(HELP + "\n")
    elif command == "/image":
        if not arg:
            raise Phi3vError("/image needs a path or URL")
        attached.append(_prepare(conversation, load_image(arg), phase))
        err.write(f"attached {arg} ({len(attached)} image(s) for the next question)\n")
    elif command == "/detach":
        err.write(f"detached {len(attached)} image(s)\n")
        attached.clear()
    elif command == "/reset":
        conversation.reset()
        attached.clear()
        err.write("conversation reset\n")
    elif command == "/format":
        conversation.settings = replace(conversation.settings, guidance=_format(arg))
        err.write(f"answers from the next question on: {arg.split(' ', 1)[0] if arg else 'text'}\n")
    elif command == "/stats":
        err.write((format_stats(conversation.last_stats) if conversation.last_stats else "no answer yet") + "\n")
    elif command == "/load":
        if not arg:
            raise Phi3vError("/load needs a file saved with /save")
        turns = restore(conversation, read_saved(arg), load_image)
        attached.clear()
        err.write(f"loaded {turns} turn{'' if turns == 1 else 's'} from {arg}: the next question continues them\n")
    elif command in ("/save", "/save!"):
        if not arg:
            raise Phi3vError(f"{command} needs a file name")
        err.write(f"saved {save_transcript(conversation, arg, overwrite=command == '/save!')}\n")
    else:
        raise Phi3vError(f"unknown command {command} (/help lists them)")
    return True


def _format(arg: str):
    """`/format` KIND [ARG] -> the output constraint (None for text)."""
    kind, _, value = arg.partition(" ")
    value = value.strip()
    if kind in ("", "text"):
        return None
    if kind == "json":
        return guidance.json_object("/format json")
    needs = {"schema": "a schema file or inline JSON", "regex": "a pattern", "grammar": "a .lark file"}
    if kind not in needs:
        raise Phi3vError(f"/format takes text, json, schema, regex or grammar, not {kind!r}")
    if not value:
        raise Phi3vError(f"/format {kind} needs {needs[kind]}")
    option = {"schema": "json_schema_arg", "regex": "regex_arg", "grammar": "grammar_arg"}[kind]
    return replace(guidance.from_cli(**{option: value}), label=f"/format {kind}")


def run_chat(conversation: Conversation, images: list[ImageInput], stdin: TextIO, out: TextIO, err: TextIO,
             interactive: bool, format_stats, phase: Phase | None = None) -> int:
    """The loop; returns the exit code. `images` (the `-i` ones) are prepared first: a bad one raises Phi3vError.
    `phase`: the phase line on stderr (phase.Phase: shown only on a terminal); None shows nothing."""
    attached = [_prepare(conversation, image, phase) for image in images]
    if interactive:
        _setup_readline()
        err.write("Chat with Phi-3-vision. /help for commands, Ctrl-D to leave.\n")
    notice = PrefillNotice()
    try:
        return _loop(conversation, attached, stdin, out, err, interactive, format_stats, phase, notice)
    finally:
        notice.close()


def _loop(conversation: Conversation, attached: list, stdin: TextIO, out: TextIO, err: TextIO, interactive: bool,
          format_stats, phase: Phase | None, notice: PrefillNotice) -> int:
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    break
                line = line.rstrip("\n")
        except EOFError:  # Ctrl-D: leave on a line of its own, not after the "> " prompt
            if interactive:
                err.write("\n")
            break
        except KeyboardInterrupt:
            err.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if not line.startswith("/"):
            attached = _ask(conversation, line, attached, out, err, phase, notice)
            continue
        try:
            if not _command(conversation, line, attached, err, format_stats, phase):
                break
        except KeyboardInterrupt:
            err.write("\n[command cancelled]\n")
        except Exception as exc:
            err.write(f"Error: {_one_line(exc)}\n")
    return 0


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()
