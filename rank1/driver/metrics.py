"""Where per-step metrics go: always `metrics.jsonl` in the run folder; TensorBoard and W&B when
logging.report_to names them. Both are optional imports: a run that does not ask for them never
loads them, and one that asks without the package installed fails before training starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from rank1.core.config import Config, ConfigError
from rank1.core.flags import to_dict


def log(message: str) -> None:
    """The driver's log line, on stderr and clear of progress bars."""
    tqdm.write(f"[rank1] {message}", file=sys.stderr)


class MetricsSink:
    def __init__(self, cfg: Config, out: Path, start_step: int):
        self.path = out / "metrics.jsonl"
        keep_metrics(self.path, upto_step=start_step)
        self._file = self.path.open("a")
        self._tb = self._wandb = None
        if "tensorboard" in cfg.logging.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(f"logging.report_to tensorboard: needs the tensorboard package ({e})") from None
            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in cfg.logging.report_to:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError(f"logging.report_to wandb: needs the wandb package ({e})") from None
            # Credentials come from WANDB_API_KEY / `wandb login`, never from rank1's config or logs.
            self._wandb = wandb.init(project=cfg.logging.wandb_project, name=out.name, dir=str(out), config=to_dict(cfg),
                                     resume="allow", id=f"rank1-{out.resolve().name}")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()
        if self._wandb:
            self._wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def keep_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric rows past the checkpoint: those steps run again."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= upto_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; a line torn by a kill mid-write is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curve(metrics_path: Path, png: Path, key: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if key in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r[key] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
