"""What the commands print: the stats block, the `run --json` object, and Ctrl-C during a prefill."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def prefill_interruptible():
    """og 0.18 holds the GIL for a whole prefill (minutes for the real model on a CPU), so Python's Ctrl-C handler
    would run only when it returns. During the prefill of `run` there is no answer yet to keep, so Ctrl-C there
    ends the process at once (the signal's default action; the shell reports 130), and Python's handler is back
    for the answer (which keeps the partial text). Only in the main thread, where signals can be set."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not \
            signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def format_stats(stats) -> str:
    from phi3v_ort.engine.events import prompt_time

    images = ", ".join(str(n) for n in stats.image_tokens) or "none"
    return "\n".join([
        f"prompt tokens      {stats.prompt_tokens} (image tokens: {images})",
        f"preprocessing      {stats.preprocess_s * 1000:.1f} ms",
        f"time to 1st token  {stats.time_to_first_token_s * 1000:.1f} ms ({prompt_time(stats)})",
        f"decode             {stats.decode_tokens_per_s:.1f} tokens/s",
        f"generated          {stats.generated_tokens} tokens, finish reason: {stats.finish_reason}",
        f"KV cache           {stats.kv_cache_bytes / 2**20:.1f} MiB for max_length {stats.max_length} "
        f"({'shared buffer' if stats.share_buffer else 'growing'}"
        f"{', CUDA graph' if stats.cuda_graph else ''}, {stats.device})",
    ] + ([f"model              loaded in {stats.load_s:.2f} s"
          f"{' (warm: a running server had it loaded)' if stats.warm else ''}"] if stats.load_s is not None else [])
      + (["conversation       continued the kept KV cache (only this turn's tokens were prefilled)"]
         if stats.kv_reused else []) + ([f"conversation       re-prefilled: {stats.reprefill_reason}"]
                                        if stats.reprefill_reason else []))


def answer_json(finished, result) -> dict:
    """`run --json`'s object. One name per fact: the counts and the finish reason at the top level (as
    `prepare --json` names them), `parsed` only with a constraint, timings and memory in `stats`."""
    stats = {k: v for k, v in finished.stats.to_dict().items()
             if k not in ("prompt_tokens", "image_tokens", "finish_reason")}
    return {
        "text": finished.text,
        "token_ids": list(finished.token_ids),
        "prompt_tokens": finished.stats.prompt_tokens,
        "num_image_tokens": list(finished.stats.image_tokens),
        "finish_reason": finished.stats.finish_reason,
        **({"parsed": result.parsed} if result.has_parsed else {}),
        "stats": stats,
    }


def finish_answer(finished, settings, out, as_json: bool, show_stats: bool) -> None:
    """What `run` prints once the answer is complete, whichever side generated it: `--json`'s object (or the
    streamed text's last newline), `--stats`; a constrained answer that is not complete is never passed off as
    fine (Phi3vError after printing)."""
    import json

    import click

    from phi3v_ort.engine import guidance
    from phi3v_ort.errors import Phi3vError

    result = guidance.outcome(settings.guidance, finished.text, finished.stats.finish_reason,
                              finished.stats.generated_tokens)
    if as_json:
        click.echo(json.dumps(answer_json(finished, result), ensure_ascii=False))
    else:
        out.write("\n")
        out.flush()
    if show_stats:
        click.echo(format_stats(finished.stats), err=True)
    if not result.complete:
        raise Phi3vError(result.problem)
