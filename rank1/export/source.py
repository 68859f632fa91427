"""What is being exported: the adapter folder of a run, of one of its checkpoints, or a bare adapter folder.

    RUN_DIR/adapter/                              the final adapter (config.yaml, metrics.jsonl beside it)
    RUN_DIR/checkpoints/step-NNNNNN/adapter/      a checkpoint's adapter (the run dir is two levels up)
    ANY/adapter_config.json                       a bare PEFT folder (no run config; the card says less)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from rank1.core.adapter_io import CONFIG, AdapterFolderError, check_adapter_folder


class ExportError(ValueError):
    """An export or push that cannot be done; the message names the path, flag or repo."""


@dataclass
class ExportSource:
    adapter_dir: Path  # holds adapter_config.json + adapter_model.safetensors
    run_dir: Path | None  # the rank1 run it came from, if any
    step: int | None  # checkpoint step, None for the final adapter
    adapter_config: dict
    config: object | None  # rank1.core.config.Config of the run
    eval_summary: dict | None  # RUN_DIR/eval/summary.json
    run_summary: dict | None  # RUN_DIR/summary.json: held-out accuracy at the run's start and end
    final_metrics: dict | None  # last row of metrics.jsonl

    @property
    def base_model(self) -> str:
        return self.adapter_config.get("base_model_name_or_path") or ""


def _is_adapter(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def locate(path: str | Path) -> ExportSource:
    given = Path(path).expanduser()
    if not given.exists():
        raise ExportError(f"{given}: no such run directory, checkpoint or adapter folder")
    run_dir, step = None, None
    if _is_adapter(given / "adapter"):  # a run dir or a checkpoint dir
        adapter = given / "adapter"
        if given.parent.name == "checkpoints" and given.name.startswith("step-"):
            run_dir, step = given.parent.parent, _step_of(given.name)
        else:
            run_dir = given
    elif _is_adapter(given):  # the adapter folder itself
        adapter = given
        parent = given.parent
        if parent.parent.name == "checkpoints" and parent.name.startswith("step-"):
            run_dir, step = parent.parent.parent, _step_of(parent.name)
        elif (parent / "config.yaml").is_file():
            run_dir = parent
    else:
        hint = ""
        if (given / "checkpoints").is_dir():
            steps = sorted(p.name for p in (given / "checkpoints").glob("step-*"))
            hint = f" (the run has not finished; checkpoints: {', '.join(steps) or 'none'})"
        raise ExportError(f"{given}: no adapter to export: expected {given / 'adapter' / 'adapter_config.json'} or {given / 'adapter_config.json'}{hint}")
    try:
        adapter_config = check_adapter_folder(adapter, "export")
    except AdapterFolderError as e:
        raise ExportError(str(e)) from None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        run_dir = None
    return ExportSource(
        adapter_dir=adapter,
        run_dir=run_dir,
        step=step,
        adapter_config=adapter_config,
        config=_read_config(run_dir) if run_dir else None,
        eval_summary=_read_json(run_dir / "eval" / "summary.json") if run_dir else None,
        run_summary=_read_json(run_dir / "summary.json") if run_dir and step is None else None,
        final_metrics=_last_metrics(run_dir / "metrics.jsonl", step) if run_dir else None,
    )


def _step_of(name: str) -> int | None:
    try:
        return int(name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _read_config(run_dir: Path):
    from rank1.core.flags import from_dict

    path = run_dir / "config.yaml"
    try:
        return from_dict(yaml.safe_load(path.read_text()) or {})
    except (ValueError, yaml.YAMLError) as e:
        raise ExportError(f"{path}: cannot read the run's config ({e})") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None  # no evaluation run yet: the card says so
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object of results, got {type(data).__name__}")
    return data


def _last_metrics(path: Path, upto_step: int | None) -> dict | None:
    """The last metrics row (at or before a checkpoint's step: later rows are not this adapter's)."""
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line of a killed run: the card just omits it
    rows = [r for r in rows if isinstance(r, dict) and (upto_step is None or r.get("step", 0) <= upto_step)]
    return rows[-1] if rows else None
