"""`rank1 study`: the paper's measurements from one config, on the embedded default without network.

    rank1 study accuracy [--study.field VALUE ...] [train flags]   accuracy per arm, recovery (report.md, results.json)
    rank1 study [--study.field VALUE ...] [train flags]            + the interpretability stages (report.html)

Flags under study.* configure the study; every other flag is a train flag handed to every arm's
`rank1 train` and `rank1 eval` (e.g. --max-steps, --data.arithmetic_rows, --rollout.backend). Each stage
and each arm resumes: rerun the same command to continue an interrupted study.
"""

from __future__ import annotations

import sys

from rank1.core.commands import STUDY


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the study's own flags, the flags for every arm): a flag goes to the study when its key is study.*."""
    from rank1.core.flags import SHORT_FLAGS, flag_tables

    flags, switches = flag_tables(STUDY)
    own, forwarded, i = [], [], 0
    while i < len(argv):
        name, eq, _ = argv[i].partition("=")
        takes_value = not eq and name not in switches and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        tokens = argv[i : i + (2 if takes_value else 1)]
        key = switches[name][0] if name in switches else flags.get(name, SHORT_FLAGS.get(name, name[2:]))
        (own if key.startswith("study.") else forwarded).extend(tokens)
        i += len(tokens)
    return own, forwarded


def main(argv: list[str]) -> int:
    from rank1.core.flags import parse_command, usage

    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + usage(STUDY))
        return 0
    accuracy_only = bool(argv) and argv[0] == "accuracy"
    argv = argv[1:] if accuracy_only else argv
    cfg = parse_command(STUDY, argv)  # every flag checked here, before any arm starts
    _, forwarded = split_flags(argv)
    from rank1.driver.study.arms import PREEMPTED, Preempted, StudySignals

    try:
        with StudySignals():
            run_stages(cfg, forwarded, accuracy_only)
    except Preempted as e:
        print(f"rank1 study: {e}; rerun the same command to continue", file=sys.stderr)
        return PREEMPTED
    return 0


def run_stages(cfg, forwarded: list[str], accuracy_only: bool) -> None:
    if "accuracy" in cfg.study.stages or accuracy_only:
        from rank1.driver.study.accuracy import run_accuracy

        run_accuracy(cfg, forwarded)
    if not accuracy_only and "interpretability" in cfg.study.stages:
        from rank1.driver.study.interpretability import run_interpretability

        run_interpretability(cfg, forwarded)
