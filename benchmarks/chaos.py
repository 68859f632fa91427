"""Chaos run: the real `rank1 train` CLI through scripted faults, each compared with a fault-free run.

    python benchmarks/chaos.py [--quick] [--only sigterm,nan] [--out DIR]

Every run is a `rank1 train` child process on the embedded SmolLM2-135M and the generated arithmetic
task, started in a session of its own. The Ray processes a run starts stay in its session, so its actors
are found by Ray's process title (`ray::Learner`, `ray::EngineActor.generate` and `ray::RewardActor.score`
while inside that call) among that run's processes only, never another user's, and everything left is
killed at the end, on Ctrl-C too. Each fault runs once, in its own run, compared with a fault-free
reference run of identical settings (SFT, 2 learners, or GRPO):

  sigterm            SFT driver gets SIGTERM mid-run (expects exit 75 and a checkpoint), then --resume
  sigkill-driver     SFT driver SIGKILLed after its first checkpoint, then --resume
  sigkill-learner    one of 2 learner actors SIGKILLed mid-run; the group restarts from its checkpoint
  sigkill-engine     GRPO rollout engine actor SIGKILLed inside generate()
  sigkill-reward     GRPO reward actor SIGKILLed inside score(), in two steps
  hung-reward        GRPO reward actor SIGSTOPped (alive, silent) inside score(); rewards.hang_timeout_s 10
  nan                RANK1_FAULT_NAN_STEPS poisons SFT step 3 (its update is skipped by design)
  corrupt-checkpoint a copy of the SFT reference run, its newest checkpoint garbled at the same size, --resume
  full-disk          RLIMIT_FSIZE on the live SFT driver once its first checkpoint is written (the next one
                     cannot be: expects exit 2), then --resume without the limit

The 2-learner runs use ZeRO-0: under ZeRO-3 on 2 CPUs DeepSpeed's per-module bookkeeping makes each run
~3 min instead of ~45 s (tests/test_train_run.py covers a ZeRO-3 pre-emption). 15 `rank1 train` runs in
all; the bad-input count collects the tests (pytest --collect-only) without running any.
Samples lost: SFT, global_batch_size rows for each step missing from metrics.jsonl or whose update was
skipped; GRPO, steps x prompts_per_step x num_generations minus the completions graded. metrics.jsonl
has no completion count: a GRPO step's row is written only once all P x G completions of the step were
graded (the reward pool returns every pair or raises), so graded = sum over the steps present of P x G
minus the row's `reward_errors` (answers scored 0 by a timeout or an error).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def chars(completion: str, gold: str) -> float:
    """The GRPO runs' reward (`chaos:chars`, imported by the reward actors): the answer's length, so that
    nearly every group has a spread and every step updates the adapter (an all-skipped run would match
    its reference trivially). The nap keeps each score() call open long enough to be caught inside it."""
    time.sleep(0.2)
    return min(len(completion.strip()), 40) / 40


SFT_STEPS, GRPO_STEPS, ROWS_PER_STEP, P, G = 6, 3, 4, 2, 4
SFT = ["--data.arithmetic_rows", "32", "--data.max_length", "96", "--trainer.global_batch_size", str(ROWS_PER_STEP),
       "--trainer.micro_batch_size", "2", "--trainer.zero_stage", "0", "--max-steps", str(SFT_STEPS),
       "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "5", "--eval.in_training", "false",
       "--logging.progress", "false"]
RAY = ["--cluster.local_num_cpus", "2", "--cluster.local_object_store_mb", "256"]
GRPO = ["--objective", "grpo", "--rollout.backend", "transformers", "--rewards.functions", "chaos:chars",
        "--rewards.hang_timeout_s", "10", "--data.arithmetic_rows", "16", "--data.max_length", "96",
        "--grpo.prompts_per_step", str(P), "--grpo.num_generations", str(G), "--grpo.max_completion_length", "6",
        "--trainer.micro_batch_size", "4", "--trainer.global_batch_size", "4", "--trainer.zero_stage", "0", "--lr", "5e-3",
        "--max-steps", str(GRPO_STEPS), "--trainer.checkpoint_every", "0", "--eval.in_training", "false",
        "--logging.progress", "false", *RAY]
REFERENCES = {"sft": SFT, "two": [*SFT, "--trainer.num_learners", "2", *RAY], "grpo": GRPO}
TOLERANCE = 1e-5  # max abs difference still "within tolerance" (the 2-learner tests' atol)
RUN_TIMEOUT, EXIT_TIMEOUT = 900, 300


class Failed(Exception):
    """A fault run did not behave as rank1 promises; the message says what happened."""


def need(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


# ---------------------------------------------------------------- processes


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, process title) of every live process of session `sid`, read from /proc."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(name)) != sid or Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found.append((int(name), Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()))
        except (OSError, IndexError):  # gone meanwhile
            continue
    return found


class Runs:
    """Starts the `rank1` children (a session each: its id is the driver's pid), ends them, keeps references."""

    def __init__(self, root: Path):
        self.root, self.procs, self.refs = root, [], {}
        self.left: list[str] = []  # processes a run left behind after its driver exited: a leak, reported

    def start(self, name: str, args: list[str], log: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        out = self.root / name / "run"
        # One OpenMP thread per process, as the tests run: learners, engines and graders share 2 cores.
        base = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}
        base.pop("RAY_ADDRESS", None)  # a local Ray of the run's own, never someone else's cluster
        out.parent.mkdir(parents=True, exist_ok=True)
        with (out.parent / f"{log}.log").open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *args, "--output-dir", str(out)], cwd=REPO,
                                    env={**base, **(env or {})}, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        self.procs.append(proc)
        return proc, out

    def end(self, proc: subprocess.Popen, out: Path, log: str, expect: int = 0, timeout: float = RUN_TIMEOUT) -> str:
        """Wait for the driver's exit code (fail unless `expect`); returns its stderr."""
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.reap(proc, grace=0)
            raise Failed(f"{log}: no exit within {timeout:.0f} s; killed") from None
        self.left += [f"{log}: {title[:40]}" for title in self.reap(proc)]
        stderr = (out.parent / f"{log}.log").read_text(errors="replace")
        if code != expect:
            tail = [l for l in stderr.splitlines() if l.strip()][-1:] or ["(no output)"]
            raise Failed(f"{log}: exit {code}, expected {expect}: {tail[0][:300]}")
        return stderr

    def run(self, name: str, args: list[str], log: str, env: dict | None = None, expect: int = 0) -> str:
        return self.end(*self.start(name, args, log, env), log, expect)

    def reap(self, proc: subprocess.Popen, grace: float = 15.0) -> list[str]:
        """Give the run's session `grace` s to empty (Ray shuts down after the driver), kill what is left, return its titles."""
        deadline = time.monotonic() + grace
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_processes(proc.pid)
        for pid, _ in left:
            for sig in (signal.SIGCONT, signal.SIGKILL):  # a SIGSTOPped process too
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return [title for _, title in left]

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            self.reap(proc, grace=0)

    def reference(self, kind: str) -> Path:
        if kind not in self.refs:  # once; a failed reference fails its faults without running again
            try:
                self.run(f"reference-{kind}", REFERENCES[kind], "run")
                self.refs[kind] = self.root / f"reference-{kind}" / "run"
            except Failed as e:
                self.refs[kind] = Failed(f"the {kind} reference run: {e}")
        if isinstance(self.refs[kind], Failed):
            raise self.refs[kind]
        return self.refs[kind]


def wait_until(cond, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT):
    """Poll `cond` until it returns something truthy; fail when the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if proc.poll() is not None:
            raise Failed(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise Failed(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)
    return value


def actor(proc: subprocess.Popen, title: str) -> int | None:
    """Pid of a Ray actor of this run whose process title starts with `title`."""
    return max((pid for pid, t in session_processes(proc.pid) if t.startswith(title)), default=None)


def metrics(out: Path) -> list[dict]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # torn by a kill mid-write
            pass
    return rows


def resumed_at(stderr: str) -> str:
    found = re.search(r"resumed from \S+ at step (\d+)", stderr)
    need(found is not None, "--resume did not say where it resumed")
    return f"resumed at step {found.group(1)}"


# ---------------------------------------------------------------- the faults: each returns (times injected, note)


def driver_signal(runs: Runs, name: str, sig: signal.Signals) -> str:
    proc, out = runs.start(name, SFT, "faulted")
    if sig == signal.SIGTERM:
        wait_until(lambda: len(metrics(out)) >= 3, proc, "step 3")
    else:  # a kill is only recoverable from a checkpoint
        wait_until(lambda: (out / "checkpoints" / "step-000002").is_dir(), proc, "checkpoint step-000002")
    proc.send_signal(sig)
    stderr = runs.end(proc, out, "faulted", expect=75 if sig == signal.SIGTERM else -signal.SIGKILL, timeout=EXIT_TIMEOUT)
    need(not (out / "adapter").exists(), "the run finished before the signal; nothing was injected")
    need(sig != signal.SIGTERM or "continue with --resume" in stderr, "no pre-emption message")
    return resumed_at(runs.run(name, [*SFT, "--resume"], "resumed"))


def sigterm(runs: Runs) -> tuple[int, str]:
    return 1, "exit 75, " + driver_signal(runs, "sigterm", signal.SIGTERM)


def sigkill_driver(runs: Runs) -> tuple[int, str]:
    return 1, driver_signal(runs, "sigkill-driver", signal.SIGKILL)


def sigkill_learner(runs: Runs) -> tuple[int, str]:
    proc, out = runs.start("sigkill-learner", REFERENCES["two"], "faulted")
    wait_until(lambda: len(metrics(out)) >= 3 and (out / "checkpoints" / "step-000002").is_dir(), proc, "step 3")
    os.kill(wait_until(lambda: actor(proc, "ray::Learner"), proc, "a learner actor"), signal.SIGKILL)
    restarted = re.search(r"restarting the learner group from step (\d+)", runs.end(proc, out, "faulted"))
    need(restarted is not None, "the kill did not restart the learner group")
    return 1, f"group restarted from step {restarted.group(1)}"


def actor_fault(runs: Runs, name: str, title: str, sig: signal.Signals, times: int) -> tuple[int, str]:
    """`sig` to this run's actor while its title is `title` (inside that call), in each of steps 2..times + 1:
    from step 2 on the engines serve a trained adapter, which a restarted one must get back."""
    proc, out = runs.start(name, GRPO, "faulted")
    for step in range(1, times + 1):
        wait_until(lambda: len(metrics(out)) >= step, proc, f"step {step}")
        os.kill(wait_until(lambda: actor(proc, title), proc, f"a call in {title}"), sig)
    stderr = runs.end(proc, out, "faulted")
    key = "time_generate" if "Engine" in title else "time_reward"
    slowest = {run: max(r[key] for r in metrics(run)) for run in (out, runs.reference("grpo"))}
    # rank1.core.workers logs each call of a dead or hung worker that it re-queues
    return times, (f"calls re-queued: {stderr.count('goes back to the queue')}; slowest {key[5:]} {slowest[out]:.0f} s "
                   f"(reference {slowest[runs.reference('grpo')]:.0f} s)")


def sigkill_engine(runs: Runs) -> tuple[int, str]:
    return actor_fault(runs, "sigkill-engine", "ray::EngineActor.generate", signal.SIGKILL, times=1)


def sigkill_reward(runs: Runs) -> tuple[int, str]:
    return actor_fault(runs, "sigkill-reward", "ray::RewardActor.score", signal.SIGKILL, times=2)


def hung_reward(runs: Runs) -> tuple[int, str]:
    return actor_fault(runs, "hung-reward", "ray::RewardActor.score", signal.SIGSTOP, times=1)


def nan(runs: Runs) -> tuple[int, str]:
    stderr = runs.run("nan", SFT, "faulted", env={"RANK1_FAULT_NAN_STEPS": "3"})
    need("step 3: the loss or a gradient is NaN or inf; the update was skipped" in stderr, "the NaN step was not reported")
    return 1, "step 3 reported and its update skipped, by design"


def corrupt_checkpoint(runs: Runs) -> tuple[int, str]:
    out = runs.root / "corrupt-checkpoint" / "run"
    shutil.copytree(runs.reference("sft"), out)
    shutil.rmtree(out / "adapter")
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with state.open("r+b") as f:  # the same size, other bytes: only the manifest's checksum can tell
        f.seek(state.stat().st_size // 2)
        block = f.read(64)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))
    stderr = runs.run("corrupt-checkpoint", [*SFT, "--resume"], "resumed")
    need(f"{newest.name} is damaged" in stderr, "the garbled checkpoint was not reported")
    return 1, f"{newest.name} ({state.name}) reported damaged, " + resumed_at(stderr)


def full_disk(runs: Runs) -> tuple[int, str]:
    proc, out = runs.start("full-disk", SFT, "faulted")
    wait_until(lambda: (out / "checkpoints" / "step-000002").is_dir(), proc, "checkpoint step-000002")
    limit = 2 << 20  # the optimizer state is ~3.7 MB; metrics lines and logs stay far below
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    stderr = runs.end(proc, out, "faulted", expect=2)
    need("file size limit was reached" in stderr and "earlier checkpoints are intact" in stderr, "no clear full-disk error")
    need("Traceback" not in stderr, "a traceback instead of a clear error")
    return 1, "exit 2 with a clear error, " + resumed_at(runs.run("full-disk", [*SFT, "--resume"], "resumed"))


# fault -> (its reference, the expected verdict on the adapter, the function)
FAULTS = {"sigterm": ("sft", "yes", sigterm), "sigkill-driver": ("sft", "yes", sigkill_driver),
          "sigkill-learner": ("two", "within tolerance", sigkill_learner), "sigkill-engine": ("grpo", "yes", sigkill_engine),
          "sigkill-reward": ("grpo", "yes", sigkill_reward), "hung-reward": ("grpo", "yes", hung_reward),
          "nan": ("sft", "no", nan), "corrupt-checkpoint": ("sft", "yes", corrupt_checkpoint), "full-disk": ("sft", "yes", full_disk)}
QUICK = ("sigterm", "corrupt-checkpoint", "sigkill-reward")


# ---------------------------------------------------------------- figures


def compare(run: Path, reference: Path) -> tuple[str, float | None]:
    """(yes | within tolerance | no | ..., max abs difference) of the two runs' final adapters."""
    import torch
    from safetensors.torch import load_file

    a, b = run / "adapter" / "adapter_model.safetensors", reference / "adapter" / "adapter_model.safetensors"
    if not a.exists():
        return "missing", None
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return "no (other tensors)", None
    if not all(torch.isfinite(t).all() for t in x.values()):
        return "non-finite", None
    diff = max(float((x[k] - y[k]).abs().max()) for k in x)
    return ("yes" if all(torch.equal(x[k], y[k]) for k in x) else "within tolerance" if diff <= TOLERANCE else "no"), diff


def samples_lost(run: Path, kind: str) -> tuple[int, str]:
    """(samples lost, "" or what is wrong with the steps in metrics.jsonl: each once, in order)."""
    rows, total = metrics(run), GRPO_STEPS if kind == "grpo" else SFT_STEPS
    steps = [r["step"] for r in rows]
    by_step = {r["step"]: r for r in rows if 1 <= r["step"] <= total}
    problem = "" if steps == list(range(1, total + 1)) else f"metrics steps {steps}"
    if kind == "grpo":
        return total * P * G - sum(P * G - r["reward_errors"] for r in by_step.values()), problem
    return (total - sum(not r.get("nonfinite") for r in by_step.values())) * ROWS_PER_STEP, problem


def bad_input_cases() -> dict:
    """Collected pytest items (collection only: nothing runs) that feed rank1 bad input: every item of the
    files about bad input, and each other item whose test name says it rejects, refuses or names bad input."""
    files = re.compile(r"bad_input|cli_errors|hostile")
    names = re.compile(r"reject|refus|invalid|bad|malformed|error|corrupt|unknown|missing|wrong|unreadable|naming|_named|name_the")
    faults = re.compile(r"restart|full_disk|damaged|server_errors|endpoint_errors")  # failures of the machine, not bad input
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    items = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    hits = [i for i in items if files.search(i.split("::")[0])
            or (names.search(i.split("::")[-1].split("[")[0]) and not faults.search(i))]
    return {"cases": len(hits), "collected": len(items), "items": hits,
            "method": f"`pytest --collect-only tests` items (each parametrized case counted) in files matching /{files.pattern}/ "
                      f"or named like /{names.pattern}/ but not /{faults.pattern}/; {len(items)} items collected"}


def run_fault(runs: Runs, name: str) -> dict:
    kind, expected, fn = FAULTS[name]
    row = {"fault": name, "reference": kind, "injected": 0, "finished": "0/1", "samples_lost": None, "adapter": "-",
           "max_abs_diff": None, "expected": expected, "note": ""}
    began, runs.left = time.monotonic(), []
    try:
        reference = runs.reference(kind)
        row["injected"], row["note"] = fn(runs)
        run = runs.root / name / "run"
        row["finished"] = "1/1" if (run / "adapter").exists() else "0/1"
        row["samples_lost"], problem = samples_lost(run, kind)
        row["adapter"], row["max_abs_diff"] = compare(run, reference)
        if problem:
            row["note"] += f"; UNEXPECTED {problem}"
        if row["adapter"] != expected and not (expected == "within tolerance" and row["adapter"] == "yes"):
            row["note"] += f"; UNEXPECTED adapter (expected {expected})"
    except Failed as e:
        row["note"] = f"FAILED: {e}"
    if runs.left:
        row["note"] += f"; UNEXPECTED processes left behind: {', '.join(runs.left)}"
    row["seconds"] = round(time.monotonic() - began, 1)
    print(f"  {name}: {row['adapter']}; {row['note']} ({row['seconds']} s)", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| fault | injected | runs finished | samples lost | adapter = fault-free run's | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = r["adapter"] + (f" (max abs diff {r['max_abs_diff']:.2g})" if r["max_abs_diff"] else "")
        lost = "-" if r["samples_lost"] is None else r["samples_lost"]
        lines.append(f"| {r['fault']} | {r['injected']} | {r['finished']} | {lost} | {verdict} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (a smoke test)")
    parser.add_argument("--only", help="comma-separated faults: " + ", ".join(FAULTS))
    parser.add_argument("--out", type=Path, help="keep the run folders here and write chaos.json")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(QUICK if args.quick else FAULTS)
    if unknown := [n for n in names if n not in FAULTS]:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that the cleanup below runs
    root = args.out or Path(tempfile.mkdtemp(prefix="rank1-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    runs, began = Runs(root), time.monotonic()
    print(f"load {os.getloadavg()[0]:.2f} (1-min) on {os.cpu_count()} CPUs; runs in {root}", file=sys.stderr, flush=True)
    try:
        rows = [run_fault(runs, name) for name in names]
        bad = bad_input_cases()
    except KeyboardInterrupt:
        sys.exit("interrupted: stopping every run's processes")
    finally:  # Ctrl-C included: no driver, actor or Ray process of ours outlives this script
        runs.kill_all()
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - began
    print(f"SmolLM2-135M, arithmetic task; SFT {SFT_STEPS} steps x {ROWS_PER_STEP} rows, checkpoints every 2; 2-learner runs the same "
          f"on Ray actors (ZeRO-0); GRPO {GRPO_STEPS} steps x {P} prompts x {G} completions (transformers engine); tolerance {TOLERANCE:g}")
    print(table(rows))
    print(f"\nbad-input cases the tests try: {bad['cases']} ({bad['method']})")
    print(f"wall {wall / 60:.1f} min; load {os.getloadavg()[0]:.2f} at the end")
    if args.out:
        (args.out / "chaos.json").write_text(json.dumps({"faults": rows, "bad_input": bad, "wall_s": round(wall, 1),
                                                         "settings": REFERENCES}, indent=1))


if __name__ == "__main__":
    main()
