"""The terminal chat loop behind `phi3v-ort chat`: lines in, streamed answers out, a few slash commands.

Interactive (a terminal): line editing and history through readline, a prompt on stderr, Ctrl-C stops the current
answer (or clears the line), Ctrl-D leaves. Scripted (stdin is not a terminal): one turn per line, no prompt.
Answers go to stdout, everything else to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

from .conversation import Conversation
from .errors import Phi3vError
from .generation import Finished, Notice
from .images import ImageInput, load_image

HELP = """Commands:
  /image PATH   attach an image (path, URL) to your next question (repeatable)
  /reset        start over (forget the conversation and its images)
  /stats        the last answer's stats
  /save FILE    save the transcript as JSON
  /help         this help
  /quit         leave (or Ctrl-D)"""
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


def save_transcript(conversation: Conversation, path: str) -> Path:
    """Write atomically: a failed write never leaves a half-written file where a good one was."""
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(conversation.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Phi3vError(f"cannot save the transcript to {target}: {exc.strerror or exc}") from None
    return target


def run_chat(conversation: Conversation, images: list[ImageInput], stdin: TextIO, out: TextIO, err: TextIO,
             interactive: bool, format_stats) -> int:
    """The loop; returns the exit code."""
    if interactive:
        _setup_readline()
        err.write("Chat with Phi-3-vision. /help for commands, Ctrl-D to leave.\n")
    attached = list(images)
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    break
                line = line.rstrip("\n")
        except EOFError:
            break
        except KeyboardInterrupt:
            err.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            try:
                if command in ("/quit", "/exit"):
                    break
                elif command == "/help":
                    err.write(HELP + "\n")
                elif command == "/image":
                    if not arg:
                        raise Phi3vError("/image needs a path or URL")
                    attached.append(load_image(arg))
                    err.write(f"attached {arg} ({len(attached)} image(s) for the next question)\n")
                elif command == "/reset":
                    conversation.reset()
                    attached = []
                    err.write("conversation reset\n")
                elif command == "/stats":
                    err.write((format_stats(conversation.last_stats) if conversation.last_stats
                               else "no answer yet") + "\n")
                elif command == "/save":
                    if not arg:
                        raise Phi3vError("/save needs a file name")
                    err.write(f"saved {save_transcript(conversation, arg)}\n")
                else:
                    raise Phi3vError(f"unknown command {command} (/help lists them)")
            except Phi3vError as exc:
                err.write(f"Error: {exc}\n")
            continue
        try:
            for event in conversation.ask(line, attached):
                if isinstance(event, Notice):
                    err.write(f"[{event.message}]\n")
                elif isinstance(event, Finished):
                    out.write("\n")
                elif event.text:
                    out.write(event.text)
                out.flush()
            attached = []
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            err.write("[answer stopped]\n")
            attached = []
        except Phi3vError as exc:
            err.write(f"Error: {exc}\n")
    return 0


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()
