"""Publish a rank1 run: a standard PEFT adapter folder, a model card, optionally the merged model, and a
push to the Hugging Face Hub.

    source.py  which adapter a run dir / checkpoint / adapter folder holds, and the run's config and results
    adapter.py the exported PEFT folder (tensors cast to the chosen dtype)
    card.py    README.md with Hub metadata, the training config, eval results and usage snippets
    merge.py   merge_and_unload into a plain transformers model (after checking the base fits)
    push.py    create_repo + one commit of the folder, with the user's token
    cli.py     `rank1 export ...` and `push_run`, called by the driver when a run ends
"""

from rank1.export.cli import check_push_ready, export, main, push_run
from rank1.export.source import ExportError

__all__ = ["ExportError", "check_push_ready", "export", "main", "push_run"]
