"""`phi3v-ort ps` and `phi3v-ort stop`: the servers running on this machine (their state files: client/registry.py)."""

from __future__ import annotations

import time

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.errors import Phi3vError


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


@cli.command(short_help="List the phi3v-ort servers running on this machine.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per server, one per line.")
def ps(as_json: bool) -> None:
    """The running `phi3v-ort serve` processes (those `run` and `chat` can use): model, address, process id, how
    long it has run, how long since its last request, and when it exits on its own (--idle-exit/--keep-alive).

    \b
    Examples:
      phi3v-ort ps
      phi3v-ort ps --json
    """
    import json
    from dataclasses import asdict

    from phi3v_ort.client.registry import running

    now = time.time()
    servers = running(ready_only=False)
    if as_json:
        for record in servers:
            click.echo(json.dumps(asdict(record)))
        return
    if not servers:
        click.echo("no phi3v-ort server is running", err=True)
        return
    rows = [("MODEL", "ADDRESS", "PID", "DEVICE", "UPTIME", "IDLE", "EXITS")]
    for r in servers:
        idle = now - (r.last_request or r.started)
        exits = f"in {_duration(r.idle_exit_s - idle)} idle" if r.idle_exit_s else "-"
        rows.append((r.model_name, r.url, str(r.pid), r.device, _duration(now - r.started), _duration(idle), exits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@cli.command(short_help="Stop a phi3v-ort server running on this machine.")
@click.argument("target", required=False, metavar="[MODEL|PID]")
@click.option("--all", "stop_all", is_flag=True, help="Stop every running server.")
@click.option("--timeout", type=float, default=30.0, show_default=True, metavar="SECONDS",
              help="How long to wait for each to exit (it finishes running answers first).")
def stop(target: str | None, stop_all: bool, timeout: float) -> None:
    """Stop a running server (SIGTERM: queued requests are refused, running answers finish), and wait until it
    has exited. MODEL is the name `ps` shows, the package folder's name or its path; PID its process id; with
    neither, the only running server.

    \b
    Examples:
      phi3v-ort stop
      phi3v-ort stop phi-3-vision
      phi3v-ort stop 12345
      phi3v-ort stop --all
    """
    from phi3v_ort.client.control import select, stop_server

    if stop_all and target:
        raise Phi3vError("give either a MODEL or PID, or --all")
    for record in select(target, stop_all):
        stop_server(record, timeout)
        click.echo(f"stopped {record.model_name} at {record.url} (pid {record.pid})", err=True)
