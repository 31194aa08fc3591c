"""Charts of benchmark results (matplotlib, written as PNG files).

`speedup_chart` (`leapfrog bench --chart`, scripts/plot_bench.py): one group of bars per
mode, its speedup over `ar` in each result given (for example a greedy run and a
temperature-0.7 run of the same prompts), labelled with tau, the tokens per forward
pass; the dashed line at 1.0 is `ar`.

`pareto_chart` (`leapfrog sweep`): latency per token against compute per token for every
grid point and mode, with the Pareto frontier marked.
"""

from __future__ import annotations

from pathlib import Path


def speedup_chart(results: list[dict], labels: list[str], out: str | Path, title: str = "") -> Path:
    """Write a PNG of each mode's speedup over ar in every result; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    modes = [m for m in results[0]["modes"] if m != "ar"]
    for r in results[1:]:
        modes += [m for m in r["modes"] if m not in modes and m != "ar"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(modes) + 2), 4.2))
    for i, (result, label) in enumerate(zip(results, labels)):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(modes))]
        present = [(x, result["modes"][m]) for x, m in zip(xs, modes) if m in result["modes"]]
        bars = ax.bar([x for x, _ in present], [m["speedup_vs_ar"] for _, m in present], width, label=label)
        for bar, (_, m) in zip(bars, present):
            ax.annotate(f"{m['mean_accepted']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(modes)), modes, rotation=20)
    ax.set_ylabel("tokens/s relative to ar (label: tau)")
    r0 = results[0]
    ax.set_title(title or f"{r0['model']} {r0['dtype']}, {r0['device']}, {r0['prompts']} prompts, {r0['max_new_tokens']} tokens")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def pareto_chart(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        ax.scatter([r["worker_ms_per_token"] for r in mine], [r["latency_ms_per_token"] for r in mine], label=mode, s=28)
        if mode not in ("ar", "ht", "ht-pld"):
            for r in mine:
                ax.annotate(f"{r['workers']}w {r['policy']} p{r['predict_layer']}", (r["worker_ms_per_token"], r["latency_ms_per_token"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["worker_ms_per_token"])
    ax.plot([r["worker_ms_per_token"] for r in front], [r["latency_ms_per_token"] for r in front], "k--o", linewidth=1,
            markersize=11, markerfacecolor="none", label="Pareto frontier")
    ax.set_xlabel("compute: busy worker-ms per token")
    ax.set_ylabel("latency: ms per token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
