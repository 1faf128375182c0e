"""Render a bench result as a Markdown table and a PNG chart of the ratios."""

from __future__ import annotations

from pathlib import Path


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def _mib(x) -> str:
    return f"{x / 2**20:,.0f} MiB" if x else "n/a"


def vision_cell(m: dict) -> str:
    return _ms(m["vision_s"]["median"]) if "vision_s" in m else "n/a"


def prefill_cell(m: dict) -> str:
    """The decoder's prefill speed where the vision time was measured apart; else the old figure, marked as
    including the vision model (results written before vision_s existed)."""
    if "prefill_without_vision_tps" in m:
        return f"{m['prefill_without_vision_tps']['median']:.0f}"
    return f"{m['prefill_tps']['median']:.0f} (incl. vision)"


def markdown(r: dict) -> str:
    """The whole report: settings, engines, generation, ratios, the vision sweep, workloads, the decode limit."""
    engines = [e for e in r["engines"] if "error" not in e]
    lines = _header(r, engines) + _generation(r, engines) + _ratios(r) + _vision_sweep(engines)
    for e in engines:
        lines += _turn2(e) + _batch(e)
    return "\n".join(lines + _decode_limit(r, engines)) + "\n"


def _header(r: dict, engines: list[dict]) -> list[str]:
    env, s = r["environment"], r["settings"]
    lines = [f"# phi3v-ort bench: {Path(s['model_dir']).name} on {s['device']}", "",
             f"- machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB"
             + (f", GPU {r['gpu']}" if r.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"- settings: {s['reps']} repetitions after {s['warmup']} warm-up, {s['max_new_tokens']} new tokens "
             f"(EOS ignored), greedy; shared KV buffer {s['share_buffer']}, CUDA graph {s['cuda_graph']}; "
             f"inputs: processor {s.get('processor', 'og')}, crops {s.get('crops') or 16}",
             f"- command: `{r['command']}`", ""]
    for e in r["engines"]:
        if "error" in e:
            lines.append(f"- {e['label']}: FAILED ({e['error']})")
    lines += ["## Engines", "", "| engine | precision | intra-op threads | load | peak RSS | GPU memory |",
              "|---|---|---|---|---|---|"]
    for e in engines:
        mem = e.get("memory", {})
        lines.append(f"| {e['label']} | {e['precision']} | {e.get('threads') or 'default'} | {e['load_s']:.1f} s | "
                     f"{_mib(mem.get('peak_rss_bytes'))} | {_mib(mem.get('gpu_memory_bytes'))} |")

    return lines


def _generation(r: dict, engines: list[dict]) -> list[str]:
    lines: list[str] = []
    lines += ["", "## Generation (median, p90 in brackets)", "",
              "| scenario | engine | prompt tokens | preprocess ms | time to first token ms | vision ms (alone) | "
              "prefill tok/s (vision excluded) | decode tok/s | end to end s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, prep in r.get("prepared", {}).items():
        for e in engines:
            sc = e["scenarios"].get(name)
            if not sc or "metrics" not in sc:
                continue
            m = sc["metrics"]
            lines.append(f"| {name} | {e['label']} | {prep['prompt_tokens']} | {_ms(m['preprocess_s']['median'])} | "
                         f"{_ms(m['ttft_s']['median'])} ({_ms(m['ttft_s']['p90'])}) | {vision_cell(m)} | "
                         f"{prefill_cell(m)} | "
                         f"{m['decode_tps']['median']:.1f} ({m['decode_tps']['p90']:.1f}) | {m['e2e_s']['median']:.2f} |")

    return lines


def _ratios(r: dict) -> list[str]:
    lines: list[str] = []
    for ref, rows in r.get("ratios", {}).items():
        lines += ["", f"## phi3v-ort vs {ref}", "",
                  "| scenario | decode speed-up | prefill speed-up | TTFT ratio (ort/ref) | preprocessing share of ort TTFT |",
                  "|---|---|---|---|---|"]
        for name, row in rows.items():
            if name == "vision-sweep":
                continue
            lines.append(f"| {name} | {row['decode_speedup']:.2f}x | {row['prefill_speedup']:.2f}x | "
                         f"{row['ttft_ratio']:.3f} | {row['preprocess_share_of_ttft']:.1%} |")

    return lines


def _vision_sweep(engines: list[dict]) -> list[str]:
    lines: list[str] = []
    sweep = [e for e in engines if "vision-sweep" in e["scenarios"]]
    if sweep:
        crops = list(sweep[0]["scenarios"]["vision-sweep"]["crops"])
        lines += ["", "## Vision model alone, by crop count (ms, median; [slots fed]: every slot is computed, the "
                  "layout picks the used ones)", "", "| crops | " + " | ".join(e["label"] for e in sweep) + " |",
                  "|---|" + "---|" * len(sweep)]
        for c in crops:
            cells = [e["scenarios"]["vision-sweep"]["crops"][c] for e in sweep]
            lines.append(f"| {c} | " + " | ".join(_ms(x["median"]) + (f" [{x['slots']}]" if "slots" in x else "")
                                                  for x in cells) + " |")

    return lines


def _turn2(e: dict) -> list[str]:
    lines: list[str] = []
    t2 = e["scenarios"].get("turn2")
    if t2:
        m = t2["metrics"]
        lines += ["", "## Conversation turn 2 (one-image chat, phi3v-ort)", "",
                  "| | prompt tokens prefilled | time to first token ms |", "|---|---|---|",
                  f"| kept generator (append only the new turn) | {m['reuse_prompt_tokens']['median']:.0f} | "
                  f"{_ms(m['reuse_ttft_s']['median'])} |",
                  f"| re-prefill of the transcript (og example) | {m['reprefill_prompt_tokens']['median']:.0f} | "
                  f"{_ms(m['reprefill_ttft_s']['median'])} |", "",
                  f"Reuse takes {m['ratio_reuse_over_reprefill']:.1%} of the re-prefill's time to first token."]
    return lines


def _batch(e: dict) -> list[str]:
    lines: list[str] = []
    b = e["scenarios"].get("batch")
    if b:
        m = b["metrics"]
        lines += ["", f"## Batch throughput ({b['items']} images, phi3v-ort, one model worker process)", "",
                  "| mode | items/s |", "|---|---|",
                  f"| 1 intra-op thread, sequential (each item prepared after the last is written) | "
                  f"{m['one_thread_sequential_items_per_s']['median']:.2f} |",
                  f"| {m['threads']} threads, sequential | {m['sequential_items_per_s']['median']:.2f} |",
                  f"| {m['threads']} threads, preparation overlapped (2 threads, 4 ahead) | "
                  f"{m['pool_items_per_s']['median']:.2f} |", "",
                  f"{m['threads']} threads / 1: {m['ratio_threads_over_one']:.2f}x; overlapped / sequential: "
                  f"{m['ratio_pool_over_sequential']:.2f}x. Where the time goes (sum over the items of the last "
                  "run): " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in m["time_split_s"].items())
                  + "."]
    return lines


def _decode_limit(r: dict, engines: list[dict]) -> list[str]:
    lines: list[str] = []
    bw = r["bandwidth"]
    if r.get("limits") and r.get("prepared"):  # only runs with generate scenarios have decode rates to compare
        lines += ["", "## Physical limit of decoding", "",
                  f"Memory bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['source']}). One decode step reads "
                  "every decoder weight once, so decode tokens/s <= bandwidth / weight bytes.", "",
                  "| engine | decoder weight bytes | limit tok/s | best measured tok/s | share of limit |",
                  "|---|---|---|---|---|"]
        for e in engines:
            lim = r["limits"].get(e["label"])
            if not lim:
                continue
            best = max((sc["metrics"]["decode_tps"]["median"] for sc in e["scenarios"].values()
                        if "metrics" in sc and "decode_tps" in sc["metrics"]), default=0.0)
            lines.append(f"| {e['label']} | {lim['weight_bytes'] / 2**20:,.0f} MiB | {lim['decode_limit_tps']:.1f} | "
                         f"{best:.1f} | {best / lim['decode_limit_tps']:.0%} |")
    return lines


def no_chart_reason(r: dict) -> str:
    """Why a run has no chart, in words (chart() returned None)."""
    import importlib.util

    from phi3v_ort.bench.scenarios import SCENARIOS
    from phi3v_ort.errors import install_hint

    ran = [e["label"] for e in r["engines"] if "error" not in e]
    if len(ran) < 2:
        return (f"it compares phi3v-ort with the transformers reference, and only {ran[0] if ran else 'no engine'} "
                "ran")
    if importlib.util.find_spec("matplotlib") is None:
        return f"it needs matplotlib: {install_hint('bench')}"
    generating = ", ".join(name for name, s in SCENARIOS.items() if s.kind == "generate")
    return f"it compares generation, and no scenario of this run generates ({generating} do)"


def chart(r: dict, path: Path) -> Path | None:
    """Bars of phi3v-ort's decode speed-up and time-to-first-token ratio per scenario; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    refs = {ref: {k: v for k, v in rows.items() if k != "vision-sweep"} for ref, rows in r.get("ratios", {}).items()}
    refs = {k: v for k, v in refs.items() if v}
    if not refs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(refs)
    for i, (ref, rows) in enumerate(refs.items()):
        names = list(rows)
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [rows[n]["decode_speedup"] for n in names], width, label=f"vs {ref}")
        axes[1].bar(xs, [rows[n]["ttft_ratio"] for n in names], width, label=f"vs {ref}")
        for ax in axes:
            ax.set_xticks([j + width * (len(refs) - 1) / 2 for j in range(len(names))], names, rotation=20)
    axes[0].axhline(1, color="gray", lw=0.8)
    axes[1].axhline(1, color="gray", lw=0.8)
    axes[0].set_title("decode speed-up (phi3v-ort / reference), higher is better")
    axes[1].set_title("time to first token (phi3v-ort / reference), lower is better")
    axes[0].legend()
    fig.suptitle(f"{Path(r['settings']['model_dir']).name} on {r['settings']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
