"""Run tracking: one JSON line per optimizer step in metrics.jsonl (plot it with any tool), and WandB."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import json_safe
from .errors import EditTunerError


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one torn by a hard kill mid-write."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return None


class MetricsLog:
    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop lines past the checkpoint so the log reads as one uninterrupted run.
            kept = [line for line in self.path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


REPORT_TO = ("auto", "wandb", "none")


def resolve_report_to(report_to: str) -> str:
    """auto: wandb when the environment asks for it (WANDB_API_KEY or WANDB_MODE set), else none."""
    if report_to not in REPORT_TO:
        raise EditTunerError(f"--report_to {report_to}: choose wandb, none or auto")
    if report_to == "auto":
        return "wandb" if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "none"
    return report_to


class Tracker:
    """metrics.jsonl always; WandB too when asked. Only the main process makes one (others get None)."""

    def __init__(self, output_dir: Path, report_to: str, config: dict, start_step: int = 0, resumed: bool = False):
        self.metrics = MetricsLog(output_dir / "metrics.jsonl", truncate_after_step=start_step)
        self.run = None
        if resolve_report_to(report_to) == "wandb":
            self.run = _start_wandb(output_dir, config, resumed)

    def log(self, record: dict) -> None:
        self.metrics.log(record)
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def log_image(self, key: str, path: Path, step: int, caption: str) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.run is not None:
            self.run.finish()


def _start_wandb(output_dir: Path, config: dict, resumed: bool):
    """A run in WANDB_PROJECT (default qwen-image) named WANDB_NAME; a resumed training run continues its
    WandB run (the id is kept in the run dir)."""
    try:
        import wandb
    except ImportError:
        raise EditTunerError("--report_to wandb: the wandb package is not installed; pip install wandb, "
                             "or pass --report_to none") from None
    id_file = output_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "qwen-image", name=os.environ.get("WANDB_NAME"),
                         config=config, dir=str(output_dir), id=run_id, resume="allow" if run_id else None)
    except Exception as exc:  # wandb raises many types (network, auth, usage); all mean the same to the user
        raise EditTunerError(f"--report_to wandb: cannot start the WandB run ({exc}); check WANDB_API_KEY / "
                             "WANDB_MODE (offline works without a network), or pass --report_to none") from None
    id_file.write_text(run.id + "\n")
    return run
