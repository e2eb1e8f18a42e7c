"""`flowers-dist report RUN_DIR`: plots and a text summary from metrics.jsonl alone (finished or killed runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import metrics_log
from .config import ConfigError


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The records of a run (metrics_log's rule: a line counts once it is whole); after a resume the last
    record per epoch and per step wins."""
    path = metrics_log.path_of(run_dir)
    if not path.is_file():
        raise ConfigError(f"report {run_dir}: no metrics.jsonl there; is it a run folder?")
    records = metrics_log.read(path)
    ends = metrics_log.events(records, "end")
    classes_file = run_dir / "classes.json"
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else None
    return {
        "epochs": metrics_log.latest_per(records, "epoch", "epoch"),
        "steps": metrics_log.latest_per(records, "step", "step"),
        "end": ends[-1] if ends else None,
        "classes": classes,
        "starts": [r for r in records if r.get("event") in ("start", "resume")],
    }


def summary_text(run_dir: Path, m: dict[str, Any], target: float | None) -> str:
    epochs, end = m["epochs"], m["end"]
    lines = [
        f"run {run_dir}",
        f"status: {'finished' if end else 'unfinished (no end record: killed or still running)'}",
        f"epochs recorded: {len(epochs)}, step rows: {len(m['steps'])}, (re)starts: {len(m['starts'])}",
    ]
    if epochs:
        best = max(epochs, key=lambda r: (r["val_acc"], -r["epoch"]))
        last = epochs[-1]
        lines.append(
            f"best val accuracy: {best['val_acc']:.4f} at epoch {best['epoch'] + 1} (val loss {best['val_loss']:.4f})"
        )
        lines.append(
            f"last epoch {last['epoch'] + 1}: train loss {last['train_loss']:.4f} acc {last['train_acc']:.4f}, "
            f"val loss {last['val_loss']:.4f} acc {last['val_acc']:.4f}"
        )
        mean_ips = sum(r["images_per_s"] for r in epochs) / len(epochs)
        lines.append(f"training throughput: {mean_ips:.1f} images/s (mean over epochs)")
        if target is not None:
            hit = first_hit(epochs, target)
            lines.append(
                f"time to {target:.2%} val accuracy: "
                + (f"{hit['elapsed']:.1f} s (epoch {hit['epoch'] + 1})" if hit else "not reached")
            )
    if m["steps"]:
        waits = [r["data_wait_fraction"] for r in m["steps"]]
        lines.append(f"data wait: {sum(waits) / len(waits):.1%} of step time (mean over step rows)")
    if end:
        lines.append(f"total time: {end['total_time']:.1f} s")
    return "\n".join(lines) + "\n"


def first_hit(epochs: list[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """The first epoch record at or above the target val accuracy; None if none is (or there is no target)."""
    return next((r for r in epochs if target is not None and r["val_acc"] >= target), None)


def _target(run_dir: Path, m: dict[str, Any]) -> float | None:
    if m["end"] and "target_accuracy" in m["end"]:
        return m["end"]["target_accuracy"]
    try:
        import yaml

        return float(yaml.safe_load((run_dir / "config.yaml").read_text())["tracking"]["target_accuracy"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _pyplot():
    """matplotlib's pyplot on the Agg backend: reports are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_x(r: dict[str, Any]) -> int:
    """An epoch's row sits at the step that ended it, so steps and epochs share one x axis."""
    return r.get("step", r["epoch"] + 1)


def _save(fig, path: Path) -> Path:
    """Write one figure and close it (a report draws several; open figures hold their memory)."""
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _loss_figure(epochs: list[dict], steps: list[dict]):
    """Train loss per log interval and per epoch, and val loss, over optimizer steps."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    if steps:
        ax.plot(
            [r["step"] for r in steps], [r["loss"] for r in steps], alpha=0.5, label="train loss (log interval, rank 0)"
        )
    ax.plot([_epoch_x(r) for r in epochs], [r["train_loss"] for r in epochs], "o-", label="train loss (epoch)")
    ax.plot([_epoch_x(r) for r in epochs], [r["val_loss"] for r in epochs], "s-", label="val loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _accuracy_figure(epochs: list[dict], target: float | None):
    """Train and val accuracy per epoch, with the target as a line when there is one."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    ax.plot([r["epoch"] + 1 for r in epochs], [r["train_acc"] for r in epochs], "o-", label="train")
    ax.plot([r["epoch"] + 1 for r in epochs], [r["val_acc"] for r in epochs], "s-", label="val")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _lr_figure(epochs: list[dict], steps: list[dict]):
    """The learning rate per log interval, or per epoch when no step rows were logged."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    if steps:
        ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], ".-")
    else:
        ax.plot([_epoch_x(r) for r in epochs], [r["lr"] for r in epochs], "o-")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate", yscale="log")
    ax.grid(alpha=0.3)
    return fig


def _throughput_figure(epochs: list[dict], steps: list[dict]):
    """Images/s above, the data-wait fraction below, over seconds since the (re)start."""
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(7, 6), sharex=True)
    if steps:
        top.plot(
            [r["elapsed"] for r in steps], [r["images_per_s"] for r in steps], ".-", alpha=0.7, label="log interval"
        )
        bottom.plot([r["elapsed"] for r in steps], [r["data_wait_fraction"] for r in steps], ".-")
    top.plot([r["elapsed"] for r in epochs], [r["images_per_s"] for r in epochs], "o", label="epoch (training part)")
    top.set(ylabel="images/s (all processes)", title="throughput")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set(xlabel="seconds since (re)start", ylabel="data-wait fraction", ylim=(0, 1))
    bottom.grid(alpha=0.3)
    return fig


def _confusion_figure(epochs: list[dict], classes: list[str] | None):
    """The val confusion matrix of the best epoch that logged one; None when none did."""
    with_confusion = [r for r in epochs if r.get("val_confusion")]
    if not with_confusion:
        return None
    best = max(with_confusion, key=lambda r: (r["val_acc"], -r["epoch"]))
    confusion = best["val_confusion"]
    classes = classes or [str(i) for i in range(len(confusion))]
    fig, ax = _pyplot().subplots(figsize=(6.5, 5.5))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax)
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > peak / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"val confusion, best epoch {best['epoch'] + 1} (acc {best['val_acc']:.3f})",
    )
    return fig


def write_plots(run_dir: Path) -> list[Path]:
    """Write RUN_DIR/report/*.png (loss, accuracy, lr, throughput, and confusion when an epoch logged one)."""
    m = read_metrics(run_dir)
    return _write_plots(Path(run_dir), m, _target(run_dir, m))


def _write_plots(run_dir: Path, m: dict[str, Any], target: float | None) -> list[Path]:
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    epochs, steps = m["epochs"], m["steps"]
    # Each figure is saved and closed before the next is drawn.
    written = [
        _save(_loss_figure(epochs, steps), out / "loss.png"),
        _save(_accuracy_figure(epochs, target), out / "accuracy.png"),
        _save(_lr_figure(epochs, steps), out / "lr.png"),
        _save(_throughput_figure(epochs, steps), out / "throughput.png"),
    ]
    confusion = _confusion_figure(epochs, m["classes"])
    if confusion is not None:
        written.append(_save(confusion, out / "confusion.png"))
    return written


def write_report(run_dir: Path) -> tuple[list[Path], str]:
    """Write RUN_DIR/report/*.png and summary.txt; returns the files and the summary."""
    run_dir = Path(run_dir)
    m = read_metrics(run_dir)
    target = _target(run_dir, m)
    written = _write_plots(run_dir, m, target)
    text = summary_text(run_dir, m, target)
    (run_dir / "report" / "summary.txt").write_text(text)
    written.append(run_dir / "report" / "summary.txt")
    return written, text


# -- `report --compare SWEEP_DIR`: a sweep's runs side by side ----------------------------------------------------
def compare_rows(sweep_dir: Path, plan) -> tuple[list[str], list[dict[str, Any]]]:
    """The config keys that vary across the sweep (`plan`, its sweep.json), and one row per run: its values, status
    and results."""
    from . import sweep as sweeps

    varying = [k for k in plan.runs[0].params if len({json.dumps(r.params[k]) for r in plan.runs}) > 1]
    rows = []
    for run in plan.runs:
        folder = sweeps.run_dir(Path(sweep_dir), run)
        row: dict[str, Any] = {"run": run.name, **{k: run.params[k] for k in varying}}
        row.update(_run_results(folder))
        rows.append(row)
    return varying, rows


def _run_results(run_dir: Path) -> dict[str, Any]:
    """Status, best val accuracy, lowest val loss, time to target and mean images/s of one run (blank before it starts)."""
    if not metrics_log.path_of(run_dir).is_file():
        return {"status": "not started", "epochs": 0, "best_val_acc": None, "min_val_loss": None,
                "time_to_target": None, "images_per_s": None, "val_curve": []}  # fmt: skip
    m = read_metrics(run_dir)
    epochs = m["epochs"]
    hit = first_hit(epochs, _target(run_dir, m))
    return {
        "status": "finished" if m["end"] else "unfinished",
        "epochs": len(epochs),
        "best_val_acc": max((r["val_acc"] for r in epochs), default=None),
        "min_val_loss": min((r["val_loss"] for r in epochs), default=None),
        "time_to_target": hit["elapsed"] if hit else None,
        "images_per_s": sum(r["images_per_s"] for r in epochs) / len(epochs) if epochs else None,
        "val_curve": [(r["epoch"] + 1, r["val_acc"]) for r in epochs],
    }


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The run the sweep's metric names best (val_acc: highest; val_loss, time_to_target: lowest); None before any
    run has a value. Ties go to the lower index."""
    key = {"val_acc": "best_val_acc", "val_loss": "min_val_loss", "time_to_target": "time_to_target"}[metric]
    scored = [r for r in rows if r[key] is not None]
    if not scored:
        return None
    sign = -1 if metric == "val_acc" else 1
    return min(scored, key=lambda r: sign * r[key])


COMPARE_COLUMNS = ("status", "epochs", "best_val_acc", "min_val_loss", "time_to_target", "images_per_s")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.0f}"
    return value if isinstance(value, str) else json.dumps(value)


def compare_markdown(varying: list[str], rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    columns = ["run", *varying, *COMPARE_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        mark = " (best)" if row is best else ""
        lines.append("| " + " | ".join(_cell(row[c]) + (mark if c == "run" else "") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, varying: list[str], rows: list[dict[str, Any]]) -> Path:
    import csv

    columns = ["run", *varying, *COMPARE_COLUMNS]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return path


def _compare_figure(varying: list[str], rows: list[dict[str, Any]], best: dict[str, Any] | None):
    """Val accuracy per epoch, one line per run, labelled by its varying values; the best run drawn thicker."""
    fig, ax = _pyplot().subplots(figsize=(8, 5))
    for row in rows:
        if not row["val_curve"]:
            continue
        x, y = zip(*row["val_curve"])
        label = row["run"] + ("" if not varying else ": " + ", ".join(f"{k}={_cell(row[k])}" for k in varying))
        ax.plot(x, y, "o-", lw=3 if row is best else 1.2, label=label + (" (best)" if row is best else ""))
    ax.set(xlabel="epoch", ylabel="val accuracy", title="val accuracy per run", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def write_compare(sweep_dir: Path) -> tuple[list[Path], str]:
    """Write SWEEP_DIR/compare.md, compare.csv and compare.png; returns the files and the text (table and best)."""
    from . import sweep as sweeps

    sweep_dir = Path(sweep_dir)
    plan = sweeps.load(sweep_dir)
    metric = plan.metric
    varying, rows = compare_rows(sweep_dir, plan)
    best = best_row(rows, metric)
    text = compare_markdown(varying, rows, best)
    if best is None:
        text += f"\nbest ({metric}): none yet (no run has recorded an epoch)\n"
    else:
        values = ", ".join(f"{k}={_cell(best[k])}" for k in varying) or "the only config"
        text += f"\nbest ({metric}): {best['run']} ({values}): best val accuracy {_cell(best['best_val_acc'])}\n"
    (sweep_dir / "compare.md").write_text(text)
    written = [sweep_dir / "compare.md", _write_csv(sweep_dir / "compare.csv", varying, rows)]
    written.append(_save(_compare_figure(varying, rows, best), sweep_dir / "compare.png"))
    return written, text
