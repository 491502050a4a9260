"""The report's plots (matplotlib, no display needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def make_plots(report: dict, runs: dict, out: Path) -> list[str]:
    rows = report["runs"]
    names = [r["engine"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Decoding speed, {report['target']}")
    paths.append(_save(fig, out / "tokens_per_s.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, [r["generation_peak_bytes"] / MIB for r in rows], color="tab:orange", label="measured")
    ax.bar_label(bars, fmt="%.0f")
    planned = [(i, r["predicted_generation_bytes"] / MIB) for i, r in enumerate(rows) if r["predicted_generation_bytes"]]
    if planned:
        ax.scatter([i for i, _ in planned], [v for _, v in planned], marker="_", s=900, color="black", label="plan")
    ax.set_ylabel("generation peak (MiB)")
    ax.set_title("Memory used by generation (above loaded weights)")
    ax.legend()
    paths.append(_save(fig, out / "generation_memory.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, run in runs.items():
        if run["timeline"]:
            t, b = zip(*run["timeline"])
            ax.plot(t, [x / MIB for x in b], label=name)
    ax.set_xlabel("seconds into the first conversation")
    ax.set_ylabel("RSS above baseline (MiB)")
    ax.set_title("Memory over time during one conversation")
    ax.legend()
    paths.append(_save(fig, out / "memory_timeline.png"))

    spec = [r for r in rows if r["accepted_histogram"] and r["engine"] == "specmemo"]
    if spec:
        hist = {int(k): v for k, v in spec[0]["accepted_histogram"].items()}
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ks = sorted(hist)
        ax.bar(ks, [hist[k] for k in ks], color="tab:green")
        ax.set_xlabel("draft tokens accepted in a step")
        ax.set_ylabel("steps that drafted")
        ax.set_title(f"Accepted tokens per step ({report['draft']})")
        paths.append(_save(fig, out / "accepted_per_step.png"))

    ours = [r for r in rows if r["predicted_generation_bytes"]]
    if ours:
        paths.append(_plan_bars(ours, [r["engine"] for r in ours], "Predicted vs measured generation memory",
                                out / "predicted_vs_measured.png"))
    return paths


def _plan_bars(rows: list[dict], labels: list[str], title: str, path: Path) -> str:
    """Planned beside measured generation memory, one pair of bars per run."""
    fig, ax = plt.subplots(figsize=(max(7, len(rows)), 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["predicted_generation_bytes"] / MIB for r in rows], 0.4, label="plan")
    ax.bar([i + 0.2 for i in x], [r["generation_peak_bytes"] / MIB for r in rows], 0.4, label="measured")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("generation memory (MiB)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def batch_plots(report: dict, out: Path) -> list[str]:
    """`profile --batch`: throughput and mean per-sequence latency against batch size, per engine;
    generation memory against the plan."""
    rows = report["runs"]
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    paths = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for engine in engines:
        mine = [r for r in rows if r["engine"] == engine]
        left.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=engine)
        right.plot([r["batch"] for r in mine], [r["mean_latency_seconds"] for r in mine], marker="o", label=engine)
    for ax, label in ((left, "tokens / s (all sequences)"), (right, "mean latency per sequence (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["batches"], [str(b) for b in report["batches"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.legend()
    left.set_title(f"Throughput, {report['target']} ({report['dtype']})")
    right.set_title(f"Latency, {report['prompts']} prompts")
    paths.append(_save(fig, out / "batch_throughput.png"))

    ours = [r for r in rows if r["predicted_generation_bytes"]]
    if ours:
        paths.append(_plan_bars(ours, [f"{r['engine']}\nB={r['batch']}" for r in ours],
                                "Planned vs measured generation memory per batch size", out / "batch_memory.png"))
    return paths
