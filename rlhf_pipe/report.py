"""`rlhf-pipe report WORK_DIR [--out FILE.png]`: a run's curves from metrics.jsonl, and a summary.

One PNG of panels over the step: reward (with each scorer's `reward/<name>`), KL, entropy,
response length, clip fraction, step time and the stages' idle fractions. A panel whose keys
the run did not log (no KL with kl_coeff=0, no critic clip fraction in GRPO) is left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# (title, keys or key prefixes ending in '/'), in drawing order.
PANELS = (
    ("reward", ("reward", "reward/")),
    ("KL", ("kl", "actor/approx_kl", "actor/kl_loss")),
    ("entropy", ("entropy",)),
    ("response length (tokens)", ("response_len",)),
    ("clip fraction", ("actor/clip_frac", "critic/clip_frac")),
    ("step time (s)", ("step_s", "pipeline_s")),
    ("idle fraction per stage", ("idle_frac/",)),
)


def load_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def summarize(records: list[dict]) -> dict:
    """Mean reward of the first and last k steps (k = min(5, steps // 2), at least 1), mean
    step time and samples/s over all steps."""
    rewards = [r["reward"] for r in records if _number(r.get("reward"))]
    k = min(5, len(rewards) // 2) or 1
    steps = [r["step_s"] for r in records if _number(r.get("step_s"))]
    rates = [r["samples_per_s"] for r in records if _number(r.get("samples_per_s"))]
    return {
        "steps": len(records),
        "k": k,
        "first_reward": sum(rewards[:k]) / k if rewards else None,
        "last_reward": sum(rewards[-k:]) / k if rewards else None,
        "mean_step_s": sum(steps) / len(steps) if steps else None,
        "samples_per_s": sum(rates) / len(rates) if rates else None,
    }


def summary_lines(records: list[dict]) -> list[str]:
    s = summarize(records)
    lines = []
    if s["first_reward"] is not None:
        first, last, k = s["first_reward"], s["last_reward"], s["k"]
        lines.append(
            f"mean reward: first {k} steps {first:.4f}, last {k} steps {last:.4f} "
            f"({'+' if last >= first else ''}{last - first:.4f})"
        )
    if s["mean_step_s"] is not None:
        rate = f", {s['samples_per_s']:.1f} samples/s" if s["samples_per_s"] is not None else ""
        lines.append(f"{s['steps']} steps: mean step time {s['mean_step_s']:.3f} s{rate}")
    return lines


def write_report(work_dir: str | Path, out: str | Path | None = None) -> tuple[Path, list[str]]:
    """Plot WORK_DIR/metrics.jsonl into `out` (default WORK_DIR/report.png). Returns the PNG's
    path and the summary lines. A missing or empty metrics file is a ConfigError: one line,
    exit code 2."""
    from rlhf_pipe.config import ConfigError

    path = Path(work_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{work_dir}: no metrics.jsonl (is it a run's work dir?)")
    records = load_metrics(path)
    if not records:
        raise ConfigError(f"{path}: no steps logged yet")
    out = Path(out) if out else Path(work_dir) / "report.png"
    lines = summary_lines(records)
    plot(records, out, title=f"{work_dir} ({len(records)} steps)")
    return out, lines


def plot(records: list[dict], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed, none is opened
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(name, keys) for name, keys in ((n, _keys(records, ks)) for n, ks in PANELS) if keys]
    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if _number(r.get(key))]
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 40 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _keys(records: list[dict], wanted: tuple[str, ...]) -> list[str]:
    """The keys in `wanted` (a trailing '/' matches a prefix) that hold a number somewhere."""
    present = {k for r in records for k, v in r.items() if _number(v)}
    out = []
    for w in wanted:
        matches = sorted(k for k in present if k.startswith(w)) if w.endswith("/") else [w]
        out += [k for k in matches if k in present and k not in out]
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
