"""`rank1 export`: a run (or checkpoint, or adapter folder) -> a publishable folder -> optionally the Hub.

    rank1 export RUN_DIR_OR_CHECKPOINT --out DIR [--merge] [--dtype bf16|fp32]
                 [--push-to-hub OWNER/NAME] [--private] [--revision BRANCH] [--base-model M] [--license ID]

Without --merge DIR is a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, README.md).
With --merge DIR is the merged model (config.json, sharded model*.safetensors, tokenizer, README.md) and
the adapter goes to DIR/adapter/: a folder holding both adapter_config.json and config.json at its root
would make transformers load it as "base + adapter" instead of the merged weights.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rank1.core.adapter_io import fresh_tmp_dir, replace_dir
from rank1.core.commands import EXPORT, command_main
from rank1.export.source import ExportError, locate


def log(message: str) -> None:
    print(f"[rank1 export] {message}", file=sys.stderr, flush=True)


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"--out {out}: exists and is not empty; choose another folder or pass --force to replace it")
    return fresh_tmp_dir(out)


def export(source_path: str | Path, out: str | Path, *, merge: bool = False, dtype: str = "fp32",
           push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
           base_model: str | None = None, license: str | None = None, max_shard_size: str = "2GB",
           force: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the export folder (and push it); returns its path. Raises ExportError on bad input."""
    from rank1.export.adapter import write_export_adapter
    from rank1.export.card import render_card
    from rank1.export.push import check_repo_id, push_folder, require_token

    if revision and not push_to_hub:
        raise ExportError("--revision: only used with --push-to-hub")
    token = None
    if push_to_hub:  # before any work: a missing token should not cost a merge
        check_repo_id(push_to_hub)
        token = require_token()
    source = locate(source_path)
    base_name = base_model or source.base_model
    if not base_model and base_name and Path(base_name).expanduser().exists():
        log(f"warning: the adapter's base is the local path {base_name}; pass --base-model HUB_ID to name one others can load")
    if merge and not base_name:
        raise ExportError(f"--merge: {source.adapter_dir / 'adapter_config.json'} names no base model; pass --base-model")
    out = Path(out).expanduser()
    if out.resolve() == source.adapter_dir.resolve() or source.adapter_dir.resolve().is_relative_to(out.resolve()):
        raise ExportError(f"--out {out}: would overwrite the adapter being exported ({source.adapter_dir})")
    tmp = _prepare_out(out, force)
    try:
        adapter_out = tmp / "adapter" if merge else tmp
        write_export_adapter(source, adapter_out, dtype, base_name)
        if merge:
            from rank1.export.merge import write_merged

            log(f"merging into {base_name} ...")
            write_merged(source.adapter_dir, base_name, tmp, dtype, max_shard_size, trust_remote_code)
        (tmp / "README.md").write_text(render_card(source, repo_id=push_to_hub, merged=merge, dtype=dtype, license=license, base_model=base_name))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {source.adapter_dir} -> {out}" + (" (merged model + adapter/)" if merge else ""))
    if push_to_hub:
        url = push_folder(out, push_to_hub, token=token, private=private, revision=revision,
                          commit_message=f"Upload rank1 export of {source.run_dir or source.adapter_dir}"[:200])
        log(f"pushed to {push_to_hub}" + (f" (branch {revision})" if revision else "") + f": {url}")
    return out


# ---------------------------------------------------------------- end of a training run


def check_push_ready(cfg) -> None:
    """Call before training when cfg.export.push_to_hub is set: a bad repo id or a missing token fails now,
    not after hours of training."""
    from rank1.export.push import check_repo_id, require_token

    if not cfg.export.push_to_hub:
        return
    check_repo_id(cfg.export.push_to_hub)
    require_token()


def push_run(run_dir: str | Path, cfg) -> str | None:
    """Export RUN_DIR/adapter to RUN_DIR/export and push it to cfg.export.push_to_hub (at cfg.export.revision).

    Does nothing (returns None) when push_to_hub is unset; returns the export folder's path otherwise.
    Raises ExportError (a ValueError) if the push fails; the local export is kept.
    """
    e = cfg.export
    if not e.push_to_hub:
        return None
    out = export(run_dir, Path(run_dir) / "export", dtype=e.dtype, push_to_hub=e.push_to_hub, private=e.private,
                 revision=e.revision, force=True)
    return str(out)


# ---------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
    def run(cfg) -> None:
        e = cfg.export
        export(e.source, e.out, merge=e.merge, dtype=e.dtype, push_to_hub=e.push_to_hub, private=e.private, revision=e.revision,
               base_model=e.base_model, license=e.license, max_shard_size=e.max_shard_size, force=e.force,
               trust_remote_code=cfg.model.trust_remote_code)

    return command_main(EXPORT, argv, run, errors=(ExportError,))
