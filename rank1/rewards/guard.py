"""Grade with a wall-clock timeout that works on any thread: a persistent child process, killed when late.

math-verify's own timeout is signal.alarm, which only works on a process's main thread (Ray actor
methods and threads get an exception or no timeout at all). Here every answer is graded by a child
process (`rank1.rewards.child`) under memory and CPU limits; the parent waits on its pipe with
select() and, after `timeout_s`, kills it, scores that answer 0 with status 'timeout', and starts a
fresh child. One long-lived child per grader is far cheaper than a process per answer (importing
sympy and math-verify takes about a second).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from rank1.core.config import RewardsConfig
from rank1.core.flags import check_tree
from rank1.rewards.registry import RewardFunctionError, resolve
from rank1.rewards.result import RewardResult

STARTUP_TIMEOUT_S = 120.0  # imports on a loaded 2-core machine can be slow; this is not per answer
CPU_SLACK_S = 2.0  # RLIMIT_CPU backstop: the wall-clock kill should always come first
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding `rank1/`


class ChildGone(Exception):
    """The grading child exited (crash, limit, kill) while we were talking to it."""


def check_config(cfg: RewardsConfig) -> None:
    """Raise naming the `rewards.*` field that cannot work — in the caller, not once per answer.

    Ranges and choices are the section's own (rank1.core.config); this adds that the functions resolve."""
    check_tree(cfg, "rewards.")
    if not cfg.functions:
        raise RewardFunctionError("rewards.functions: name at least one reward function, e.g. ['math']")
    for name in cfg.functions:
        resolve(name)


class GuardedGrader:
    """Grades (gold, completion) pairs one at a time in a guarded child process (not thread-safe:
    use one grader per thread or actor).

        with GuardedGrader(RewardsConfig(functions=["math"], timeout_s=5)) as grader:
            grader.grade(r"\\frac{1}{2}", r"so \\boxed{0.5}")  # RewardResult(reward=1.0, ...)
    """

    def __init__(self, cfg: RewardsConfig):
        check_config(cfg)
        self.cfg = cfg
        self.spec = json.dumps({
            "functions": list(cfg.functions),
            "gold_format": cfg.gold_format,
            "memory_mb": cfg.memory_mb,
            "cpu_s": cfg.timeout_s + CPU_SLACK_S,
        })
        self.restarts = 0  # children replaced after a timeout or crash
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._start()

    # ------------------------------------------------------------ child lifecycle

    def _start(self) -> None:
        # The child imports what this process can import: rank1 and any user reward module.
        path = [PACKAGE_ROOT] + [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(path)))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rank1.rewards.child", self.spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        os.set_blocking(self._proc.stdin.fileno(), False)
        self._ready, self._buffer = False, b""

    @property
    def child_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_ready(self) -> None:
        """Block until the grading child has started (it is restarted after each timeout or crash)."""
        self._ensure_ready()

    def _ensure_ready(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        if not self._ready:
            try:
                hello = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
            except (ChildGone, TimeoutError) as e:
                self._kill()
                raise RuntimeError(f"the grading process did not start ({e}); see its stderr above") from None
            if not hello.get("ready"):
                self._kill()
                raise RewardFunctionError(hello.get("error", "the grading process failed to start"))
            self._ready = True

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._proc, self._ready = None, False

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._start()  # warm up the replacement now, while the caller handles this result

    def close(self) -> None:
        self._kill()

    def __enter__(self) -> "GuardedGrader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass

    # ------------------------------------------------------------ pipe I/O with deadlines

    def _write(self, data: bytes, deadline: float) -> None:
        fd, view = self._proc.stdin.fileno(), memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            _, writable, _ = select.select([], [fd], [], remaining)
            if writable:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    raise ChildGone from None

    def _read_line(self, deadline: float) -> dict:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise ChildGone
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    # ------------------------------------------------------------ grading

    def grade(self, gold: str, completion: str) -> RewardResult:
        """Grade one pair; never raises for anything the answer contains, never takes much over timeout_s."""
        if not isinstance(gold, str) or not isinstance(completion, str):
            return self._failed("error", "gold and completion must be strings, got "
                                f"{type(gold).__name__} and {type(completion).__name__}")
        self._ensure_ready()
        request = (json.dumps({"gold": gold, "completion": completion}) + "\n").encode()
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            self._write(request, deadline)
            return RewardResult(**self._read_line(deadline))
        except TimeoutError:
            self._restart()
            return self._failed("timeout", f"grading took longer than rewards.timeout_s={self.cfg.timeout_s}s; killed")
        except ChildGone:
            try:
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # closed its pipe but lingers: _restart kills it
                code = None
            self._restart()
            if code == -signal.SIGXCPU:
                return self._failed("timeout", "grading hit its CPU-time limit; killed")
            how = "hung" if code is None else f"signal {-code}" if code < 0 else f"exit code {code}"
            return self._failed("error", f"the grading process died ({how}); restarted")

    def _failed(self, status: str, message: str) -> RewardResult:
        return RewardResult(0.0, status=status, message=message, components={n: 0.0 for n in self.cfg.functions})

    def grade_many(self, pairs: list[tuple[str, str]]) -> list[RewardResult]:
        return [self.grade(gold, completion) for gold, completion in pairs]
