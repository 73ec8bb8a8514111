"""The printed table of ratios and the PNG plots, both made from the CSV rows."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List

from benchmarks.harness import UNSTABLE_PCT, is_fastbert

OP_ORDER = ["attention", "add_layer_norm", "linear_bias_gelu", "model", "embeddings", "linear",
            "linear+gelu", "linear+residual"]


def _metric(rows, metric):
    """{(op, mode, shape): {provider: value}} for one metric."""
    out: Dict[tuple, Dict[str, Any]] = defaultdict(dict)
    for r in rows:
        if r["metric"] == metric:
            out[(r["op"], r["mode"], r["shape"])][r["provider"]] = r["value"]
    return out


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"  # two significant digits even when tiny


def _cell(ratio: float, spread: float | None) -> str:
    """'1.23x ±4%', with '!' when the spread marks the ratio unstable."""
    if spread is None:
        return _ratio(ratio)
    return f"{_ratio(ratio)} ±{spread:.0f}%" + ("!" if spread > UNSTABLE_PCT else " ")


def ratio_table(rows: List[Dict[str, Any]]) -> str:
    """Speedup of each fastbert provider over each baseline (baseline time / fastbert time), the
    median over rounds with its spread (IQR over rounds, % of the median)."""
    times = _metric(rows, "time_ms")
    speed: Dict[tuple, Dict[tuple, float]] = defaultdict(dict)
    spread: Dict[tuple, Dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        key = (r["op"], r["mode"], r["shape"])
        if r["metric"].startswith("speedup_vs:"):
            speed[key][(r["provider"], r["metric"].split(":", 1)[1])] = r["value"]
        elif r["metric"].startswith("speedup_spread_pct_vs:"):
            spread[key][(r["provider"], r["metric"].split(":", 1)[1])] = r["value"]
    lines = []
    ceilings = {r["mode"]: r for r in rows if r["op"] == "ceiling" and r["metric"] in ("tflops", "gbps")}
    if ceilings:
        parts = [f"{r['mode']} {r['value']:.3g} {'TFLOP/s' if r['metric'] == 'tflops' else 'GB/s'}"
                 f" ({r['shape']})" for r in ceilings.values()]
        lines.append("measured ceilings: " + "; ".join(parts))
    unstable = total = 0
    for op in OP_ORDER:
        keys = [k for k in times if k[0] == op]
        if not keys:
            continue
        baselines = list(dict.fromkeys(p for k in keys for p in times[k] if not is_fastbert(p)))
        ours = list(dict.fromkeys(p for k in keys for p in times[k] if is_fastbert(p)))
        if not ours:
            lines.append(f"\n{op}: no fastbert provider was timed")
            continue
        label_w = max(len(f"{m} {s}") for _, m, s in keys) + 2
        prov_w = max(len(p) for p in ours) + 2
        cols = [max(len(b), 13) + 2 for b in baselines]
        lines.append(f"\n{op}: speedup of fastbert over each baseline (>1 = fastbert faster)")
        lines.append(" " * (label_w + prov_w) + "".join(f"{b:>{w}}" for b, w in zip(baselines, cols)))
        for key in keys:
            for p in ours:
                if p not in times[key]:
                    continue
                cells = []
                for b in baselines:
                    if (p, b) in speed[key]:
                        sp = spread[key].get((p, b))
                        cells.append(_cell(speed[key][(p, b)], sp))
                        total += 1
                        unstable += sp is not None and sp > UNSTABLE_PCT
                    elif b in times[key]:  # rows without per-round ratios: medians only
                        cells.append(_cell(times[key][b] / times[key][p], None))
                    else:
                        cells.append("-")
                lines.append(f"{key[1] + ' ' + key[2]:<{label_w}}{p:<{prov_w}}"
                             + "".join(f"{c:>{w}}" for c, w in zip(cells, cols)))
    if total:
        lines.append(f"\n±: spread of a ratio, the interquartile range of its per-round values as % "
                     f"of the median; !: wider than {UNSTABLE_PCT:g} %, unstable (the machine was "
                     f"busy): {unstable} of {total} ratios")
    not_timed: Dict[tuple, int] = defaultdict(int)
    for r in rows:
        if r["metric"] == "status" and r["value"] != "ok":
            not_timed[(r["op"], r["provider"], r["value"], r.get("note", ""))] += 1
    if not_timed:
        lines.append("\nnot timed:")
        for (op, provider, status, note), n in sorted(not_timed.items()):
            lines.append(f"  {op} / {provider}: {status} in {n} case(s): {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------

def _colors(panels_providers) -> Dict[str, Any]:
    """One colour per provider, the same in every panel."""
    import matplotlib.pyplot as plt
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    return {p: palette[i % len(palette)] for i, p in enumerate(sorted(set(panels_providers)))}


def _save(fig, axes, used: int, path) -> None:
    """Hide the grid's unused panels, write the PNG, free the figure."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines_plot(path, panels, ylabel, xlabel):
    """panels: {title: {provider: [(x, y), ...]}} -> one subplot per panel, a line per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    colors = _colors(p for series in panels.values() for p in series)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for provider, points in sorted(series.items()):
            points.sort()
            style = "-o" if is_fastbert(provider) else "--o"
            ax.plot([x for x, _ in points], [y for _, y in points], style, label=provider,
                    color=colors[provider],
                    linewidth=2.5 if is_fastbert(provider) else 1.2, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, axes, n, path)


def _bars_plot(path, panels, ylabels):
    """panels: {title: {shape: {provider: value}}} -> grouped bars, one group per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    colors = _colors(p for groups in panels.values() for g in groups.values() for p in g)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    for ax, (title, groups) in zip(axes.flat, panels.items()):
        providers = sorted({p for g in groups.values() for p in g})
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, [g.get(provider, 0.0) for g in groups.values()], width, label=provider,
                   color=colors[provider], hatch="" if is_fastbert(provider) else "//")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(list(groups), fontsize=7, rotation=15)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabels[title])
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, axes, n, path)


def _cases_plot(path, panels, ylabel):
    """panels: {title: ("sweep", {provider: [(x, y)]}, xlabel) or ("case", {provider: (y, err)})}
    -> a line per provider for a sweep, a bar per provider with its error bar for one case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    colors = _colors(p for panel in panels.values() for p in panel[1])
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
    for ax, (title, panel) in zip(axes.flat, panels.items()):
        kind, series = panel[0], panel[1]
        providers = sorted(series)
        if kind == "sweep":
            for provider in providers:
                points = sorted(series[provider])
                ax.plot([x for x, _ in points], [y for _, y in points],
                        "-o" if is_fastbert(provider) else "--o", label=provider,
                        color=colors[provider], linewidth=2.5 if is_fastbert(provider) else 1.2,
                        markersize=4)
            lengths = sorted({x for points in series.values() for x, _ in points})
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(x) for x in lengths])
            ax.minorticks_off()
            ax.set_xlabel(panel[2])
            ax.legend(fontsize=7)
        else:
            ax.bar(range(len(providers)), [series[p][0] for p in providers],
                   yerr=[series[p][1] for p in providers], capsize=4,
                   color=[colors[p] for p in providers], edgecolor="black", linewidth=0.5)
            for bar, provider in zip(ax.patches, providers):
                bar.set_hatch("" if is_fastbert(provider) else "//")
            ax.set_xticks(range(len(providers)))
            ax.set_xticklabels(providers, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    fig.text(0.01, 0.005, "bars: one case, error bar = interquartile range over rounds; "
                          "lines: a sweep", fontsize=7)
    _save(fig, axes, n, path)


def plot_all(rows: List[Dict[str, Any]], params: Dict[tuple, dict], out_dir: str,
             stem: str) -> List[str]:
    """Write <stem>-attention.png (the sweep), -ops.png (op shapes), -model.png; return paths."""
    written = []
    tflops, gbps = _metric(rows, "tflops"), _metric(rows, "gbps")

    sweep: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    bars: Dict[str, Dict[str, Dict[str, float]]] = defaultdict(dict)
    ylabels = {}
    for key, by_provider in list(tflops.items()) + list(gbps.items()):
        op, mode, shape = key
        p = params.get(key, {})
        if op == "attention" and p.get("sweep"):
            variant = "" if p["variant"] == "none" else f", {p['variant']}"
            title = f"attention {mode}, head dim {p['head_dim']}{variant}"
            for provider, value in by_provider.items():
                sweep[title][provider].append((p["seqlen"], value))
        elif op in ("attention", "add_layer_norm", "linear_bias_gelu"):
            title = f"{op} {mode}"
            bars[title][shape] = by_provider
            ylabels[title] = "GB/s" if key in gbps else "TFLOP/s"
    if sweep:
        path = os.path.join(out_dir, f"{stem}-attention.png")
        _lines_plot(path, sweep, "TFLOP/s (real tokens)", "sequence length (tokens per step fixed)")
        written.append(path)
    if bars:
        path = os.path.join(out_dir, f"{stem}-ops.png")
        _bars_plot(path, bars, ylabels)
        written.append(path)

    panels = model_panels(rows, params)
    if panels:
        path = os.path.join(out_dir, f"{stem}-model.png")
        _cases_plot(path, panels, "real tokens / s")
        written.append(path)
    return written


def model_panels(rows: List[Dict[str, Any]], params: Dict[tuple, dict]) -> dict:
    """The model plot's panels (see _cases_plot): a model timed at several sequence lengths is a
    sweep (lines), a model at one length is a case (bars with the spread as error bars)."""
    tokens, spreads = _metric(rows, "tokens_per_s"), _metric(rows, "time_spread_pct")
    models: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for key, by_provider in tokens.items():
        p = params.get(key, {})
        kind = {"train": "training step", "pretrain": "pre-training step (MLM + NSP)"}
        title = f"{p.get('model', key[2])} {kind.get(key[1], 'inference')}"
        for provider, value in by_provider.items():
            # tokens/s is work / median time: its relative spread is the time's
            err = value * spreads.get(key, {}).get(provider, 0.0) / 100 / 2
            models[title][provider].append((p.get("seqlen", 0), value, err))
    panels = {}
    for title, series in models.items():
        lengths = {x for points in series.values() for x, _, _ in points}
        if len(lengths) > 1:
            panels[f"{title}, by sequence length"] = (
                "sweep", {pr: [(x, y) for x, y, _ in pts] for pr, pts in series.items()},
                "sequence length")
        else:
            length = f", S={lengths.pop()}" if lengths != {0} else ""
            panels[title + length] = ("case", {pr: pts[0][1:] for pr, pts in series.items()})
    return panels
