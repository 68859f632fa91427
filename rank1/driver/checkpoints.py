"""The run directory and its checkpoints: written whole or not at all, verified before they are trusted.

    RUN/config.yaml                         the resolved config (a --resume must match it)
    RUN/checkpoints/step-NNNNNN/            state/ (DeepSpeed: optimizer, schedule, RNG per rank),
                                            adapter/, trainer_state.json, manifest.json
A checkpoint is written under a temporary name and renamed into place once its manifest (every file's
size and sha256) is written, so a kill mid-write leaves only a temp folder. On resume the newest
checkpoint whose files match its manifest is used; a truncated or corrupt one is reported and skipped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import yaml

from rank1.core.adapter_io import fresh_tmp_dir, replace_dir
from rank1.core.config import Config, ConfigError
from rank1.core.flags import from_dict, to_dict, to_yaml

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
# Fields a resumed run may change when the user names them in trainer.resume_allow_changes: they steer
# logging, placement or the run's length, never the state a checkpoint holds or the data order.
CHANGEABLE_ON_RESUME = ("logging.", "cluster.", "export.", "eval.every", "eval.in_training", "eval.batch", "trainer.max_steps",
                        "trainer.epochs", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.max_nonfinite_steps",
                        "rollout.num_engines", "rollout.cpus_per_engine", "rollout.gpus_per_engine", "rollout.max_restarts",
                        "rollout.timeout_s", "rollout.kv_cache_gb", "rollout.block_size", "rewards.num_workers", "rewards.max_restarts")
IGNORED_ON_RESUME = ("trainer.resume", "trainer.resume_allow_changes", "trainer.dry_run", "logging.output_dir")  # a moved run is the same run
# How writes that ran out of room read (errno is lost when a Ray actor raised it; torch.save says "unexpected pos").
WRITE_FAILURES = ("No space left", "File too large", "Disk quota", "unexpected pos", "PytorchStreamWriter failed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names it and what is left."""


def log(message: str) -> None:
    from rank1.driver.metrics import log as driver_log

    driver_log(message)


# ---------------------------------------------------------------- the run directory


def prepare_output_dir(cfg: Config) -> Path:
    out = Path(cfg.logging.output_dir)
    has_state = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).glob("step-*"))
    if cfg.trainer.resume and not has_state:
        raise ConfigError(f"--resume: {out} has no complete checkpoint to resume from")
    if not cfg.trainer.resume and (has_state or (out / "adapter").exists() or (out / "model").exists()):
        raise ConfigError(f"--output-dir {out} already holds a run; pass --resume to continue it or choose another directory")
    if cfg.trainer.resume and (out / "config.yaml").is_file():
        check_resume_config(yaml.safe_load((out / "config.yaml").read_text()) or {}, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_resume_config(saved: dict, cfg: Config) -> None:
    """Refuse a --resume whose config differs from the run's, naming the fields (see CHANGEABLE_ON_RESUME)."""
    before, now = _flatten(to_dict(from_dict(saved))), _flatten(to_dict(cfg))
    changed = {k: (before.get(k), now[k]) for k in now if before.get(k) != now[k] and k not in IGNORED_ON_RESUME}
    if not changed:
        return
    detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    unsafe = [k for k in changed if not k.startswith(CHANGEABLE_ON_RESUME)]
    if unsafe:
        raise ConfigError(f"--resume: the config differs from the run's in {', '.join(unsafe)}, which the checkpoints depend on "
                          f"({detail}); resume with the run's config or start a new --output-dir")
    unasked = [k for k in changed if k not in cfg.trainer.resume_allow_changes]
    if unasked:
        raise ConfigError(f"--resume: the config differs from the run's ({detail}); if intended, pass "
                          f"--trainer.resume_allow_changes {','.join(unasked)}")


# ---------------------------------------------------------------- checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    if not (folder / MANIFEST).is_file():
        return None  # written before manifests existed: trusted as its rename said it was complete
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(out: Path, report: bool = True) -> Path | None:
    """The newest whole checkpoint; newer broken ones are reported and passed over."""
    for folder in sorted((out / CHECKPOINTS).glob("step-*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        if report:
            log(f"checkpoint {folder} is damaged ({problem}); using an earlier one")
    return None


def restore_point(out: Path) -> int:
    """The step of the newest whole checkpoint, 0 when there is none."""
    checkpoint = latest_checkpoint(out, report=False)
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"] if checkpoint else 0


def save_checkpoint(out: Path, step: int, learners, keep: int, extra: dict | None = None) -> Path:
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = fresh_tmp_dir(final)  # the checkpoint exists only once it is whole (replace_dir)
    try:
        learners.call("save_checkpoint", str(tmp))
        learners.call("save_adapter", str(tmp / "adapter"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}))
        write_manifest(tmp, step)
        replace_dir(tmp, final)  # over a damaged checkpoint of the same step, passed over on resume
    except (OSError, RuntimeError) as e:
        from rank1.core.workers import WorkerDied

        # torch.save reports a short write as RuntimeError ("unexpected pos"), not OSError; a learner that
        # died mid-write (WorkerDied) and any other error keep their own handling.
        if isinstance(e, WorkerDied) or (not isinstance(e, OSError) and not any(
                s in str(e) for s in WRITE_FAILURES)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [p.name for p in sorted(root.glob("step-*"))]
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(s in str(e) for s in WRITE_FAILURES)
        why = "the disk is full or a file size limit was reached" if full else "it could not be written"
        raise CheckpointError(f"checkpoint {final} was not saved: {why} ({getattr(e, 'strerror', None) or str(e)[:200]}); "
                              f"earlier checkpoints are intact: "
                              f"{', '.join(earlier) or 'none'}") from None
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
