"""Draw one step's stage timeline: a PNG (matplotlib, Agg) and a Chrome trace (Perfetto).

A timeline is the `timeline` entry of `RLHFTrainer.train_step()`'s metrics: a list of
(stage, micro_batch, start_s, end_s), seconds from the step's start. Stage names:
    generate   the whole generation (mb -1)
    gen_mb     the interval in which micro-batch i's samples finished
    forward    ref | reward | critic | actor forward of micro-batch i
    advantage  KL, normalisation, GAE of micro-batch i (mb -1: the whole batch at once)
    train      backward of micro-batch i (gradients accumulate)
    optimizer  the optimizer step after the last micro-batch (mb -1)
and, per role, that role's own share of a stage (one row per role under the stage rows):
    actor.forward, critic.forward, reference.forward, reward.forward   (Forward stage)
    actor.train, critic.train                                          (Train stage, hatched)
A role's calls on one rank run in turn, so its row shows where Forward and Train wait for
each other on that model.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_pipe.protocols import MODEL_ROLES

# Row of each timeline stage, top to bottom. gen_mb bars sit on the generate row, over the
# grey bar of the whole generation; the optimizer step sits on the train row.
ROWS = ("generate", "forward", "advantage", "train/optimizer")
ROW_OF = {"generate": 0, "gen_mb": 0, "forward": 1, "advantage": 2, "train": 3, "optimizer": 3}
ROLE_ROWS = MODEL_ROLES
WHOLE_BATCH = -1


def role_of(name: str) -> str | None:
    """'critic.train' -> 'critic'; stage names -> None."""
    role = name.split(".", 1)[0]
    return role if "." in name and role in ROLE_ROWS else None


def rows_of(timeline) -> list[str]:
    """The stage rows, then a row for each role that has calls in `timeline`."""
    present = {role_of(name) for name, *_ in timeline}
    return list(ROWS) + [r for r in ROLE_ROWS if r in present]


def _row(name: str, rows: list[str]) -> int | None:
    role = role_of(name)
    return rows.index(role) if role else ROW_OF.get(name)


def _draw(ax, timeline, title: str) -> None:
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    height = 0.7
    rows = rows_of(timeline)
    for stage, mb, t0, t1 in timeline:
        row = _row(stage, rows)
        if row is None:
            continue
        y = len(rows) - 1 - row
        if mb == WHOLE_BATCH:
            # Whole-batch work: grey, thinner for the generate background bar.
            h = height * (1.0 if stage == "generate" else 0.8)
            ax.barh(
                y,
                t1 - t0,
                left=t0,
                height=h,
                color="0.85" if stage == "generate" else "0.55",
                edgecolor="0.3",
                linewidth=0.5,
                zorder=1,
            )
            label = {"generate": "", "optimizer": "opt", "advantage": "all"}.get(stage, "")
        else:
            h = height * (0.55 if stage == "gen_mb" else 0.8)
            ax.barh(
                y,
                t1 - t0,
                left=t0,
                height=h,
                color=colours(mb % 10),
                edgecolor="black",
                linewidth=0.5,
                zorder=2,
                hatch="///" if stage.endswith(".train") else None,
            )
            label = str(mb)
        if label:
            ax.text(
                (t0 + t1) / 2,
                y,
                label,
                ha="center",
                va="center",
                fontsize=8,
                zorder=3,
                clip_on=True,
            )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(rows)))
    ax.set_ylim(-0.6, len(rows) - 0.4)
    end = max((t1 for *_, t1 in timeline), default=1.0)
    ax.set_xlim(0, end * 1.02)
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    ax.set_title(title, fontsize=10)


def plot_timeline(timeline, path, title: str = "") -> Path:
    """One step's timeline as a PNG: a row per stage, a bar per micro-batch coloured by it."""
    return plot_timelines({title: timeline}, path)


def plot_timelines(panels: dict, path, suptitle: str = "") -> Path:
    """Several timelines (title -> timeline), one panel each, on a shared seconds axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    height = sum(0.5 + 0.35 * len(rows_of(tl)) for tl in panels.values())
    fig, axes = plt.subplots(
        n,
        1,
        figsize=(10, 1.0 + height),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [len(rows_of(tl)) for tl in panels.values()]},
    )
    for ax, (title, timeline) in zip(axes[:, 0], panels.items()):
        _draw(ax, timeline, title)
    end = max((t1 for tl in panels.values() for *_, t1 in tl), default=1.0)
    axes[0, 0].set_xlim(0, end * 1.02)
    axes[-1, 0].set_xlabel("seconds from the start of the step")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chrome_trace(timeline) -> dict:
    """Chrome trace-event JSON (complete 'X' events, microseconds), one thread per row."""
    rows = rows_of(timeline)
    events = [
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": row}}
        for i, row in enumerate(rows)
    ]
    events += [
        {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": i, "args": {"sort_index": i}}
        for i in range(len(rows))
    ]
    for stage, mb, t0, t1 in timeline:
        row = _row(stage, rows)
        if row is None:
            continue
        name = f"{stage} all" if mb == WHOLE_BATCH else f"{stage} mb{mb}"
        events.append(
            {
                "name": name,
                "cat": stage,
                "ph": "X",
                "pid": 0,
                "tid": row,
                "ts": round(t0 * 1e6, 3),
                "dur": round(max(t1 - t0, 0.0) * 1e6, 3),
                "args": {"micro_batch": mb},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timeline, path) -> Path:
    """Write `chrome_trace(timeline)` to `path`; open it in ui.perfetto.dev or chrome://tracing."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(timeline)))
    return path
