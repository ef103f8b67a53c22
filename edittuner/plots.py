"""`metrics.png` of a run: what metrics.jsonl holds, against step, in one picture (matplotlib, Agg backend: no
display needed). Written at the end of every run and by `edittuner plot RUN_DIR`.

Panels: the training loss, raw and smoothed (an exponential moving average with factor SMOOTHING, debiased as
TensorBoard's smoothing slider does, so the first steps are not pulled towards zero); the fixed-noise eval loss
(training cache, every --eval_every steps) and the validation cache's (every preview) where logged; the learning
rate; and Prodigy's d and d*lr under --optimizer prodigy_sf. A panel whose values were never logged is left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .atomic import atomic_path
from .errors import EditTunerError

SMOOTHING = 0.9   # weight of the running average; 1 - SMOOTHING on each new step's loss
PLOT_FILE = "metrics.png"


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: s_k = f s_{k-1} + (1 - f) x_k, divided by 1 - f^k."""
    out, running, weight = [], 0.0, 0.0
    for x in values:
        running = factor * running + (1 - factor) * x
        weight = factor * weight + (1 - factor)
        out.append(running / weight)
    return out


def read_run_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines, skipping a line torn by a hard kill, after the step-0 preview's metrics (its
    validation/step-000000.json) where the run made one; a clear error where there is no run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise EditTunerError(f"{run_dir}: no such run folder; give the --output_dir of a training run")
    if not path.is_file():
        raise EditTunerError(f"{run_dir}: no metrics.jsonl, so not a training run folder (or its run has not "
                             "logged a step yet); give the --output_dir of a training run")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise EditTunerError(f"{path}: no step logged yet; plot it once the run has trained a step")
    try:   # the baseline before training is not a training step, so metrics.jsonl does not hold it
        start = json.loads((Path(run_dir) / "validation/step-000000.json").read_text(encoding="utf-8"))
        records.insert(0, {k: v for k, v in start.items() if k == "step" or k.startswith("val_")})
    except (OSError, ValueError, AttributeError):
        pass
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _panels(records: list[dict]) -> list[tuple[str, list[tuple[str, list, list, dict]]]]:
    """(title, [(label, steps, values, style)]) for each panel that has data."""
    panels = []
    steps, loss = _series(records, "loss")
    if loss:
        panels.append(("training loss", [("raw", steps, loss, {"alpha": 0.35, "linewidth": 0.8}),
                                         (f"smoothed (EMA {SMOOTHING})", steps, smoothed(loss), {"linewidth": 1.6})]))
    evals = [(label, *_series(records, key), {"marker": "o", "markersize": 3})
             for label, key in (("eval (training cache)", "eval_loss"), ("validation cache", "val_eval_loss"))]
    evals = [e for e in evals if e[2]]
    if evals:
        panels.append(("fixed-noise eval loss", evals))
    steps, lr = _series(records, "lr")
    if lr:
        panels.append(("learning rate", [("lr", steps, lr, {})]))
    prodigy = [(label, *_series(records, key), {}) for label, key in (("d", "d"), ("d * lr", "d_lr"))]
    prodigy = [p for p in prodigy if p[2]]
    if prodigy:
        panels.append(("Prodigy step size", prodigy))
    return panels


def plot_metrics(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write ``<run_dir>/metrics.png`` (or ``output``) from the run's metrics.jsonl; returns its path."""
    import matplotlib
    matplotlib.use("Agg")   # files only: no display, and the same output on every machine
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    panels = _panels(read_run_metrics(run_dir))
    if not panels:
        raise EditTunerError(f"{run_dir / 'metrics.jsonl'}: no loss, eval loss, lr or d logged; nothing to plot")
    output = Path(output) if output else run_dir / PLOT_FILE
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, lines) in zip(axes[:, 0], panels):
        for label, steps, values, style in lines:
            ax.plot(steps, values, label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or title.endswith("eval loss"):   # which eval loss it is
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(run_dir.name, fontsize=11)
    fig.tight_layout()
    try:
        with atomic_path(output) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return output
