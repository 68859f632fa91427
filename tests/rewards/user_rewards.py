"""User reward functions for the tests, loaded by import path ('user_rewards:NAME') like a user's own."""

import os
import signal
import time


def short_answer(completion: str, gold: str) -> float:
    return 0.5 if len(completion) < 40 else 0.0


def raises(completion: str, gold: str) -> float:
    raise ValueError("boom")


def returns_text(completion: str, gold: str):
    return "yes"


def prints_and_scores(completion: str, gold: str) -> int:
    print("noise on stdout must not break the grading protocol")
    return 1


def sleeps(completion: str, gold: str) -> float:
    time.sleep(60)
    return 1.0


def kill_actor_once(completion: str, gold: str) -> float:
    """With completion 'KILL:<marker path>': the first time, SIGKILL the process that owns this grading
    child (the reward actor), mid-batch; afterwards score 1."""
    if completion.startswith("KILL:"):
        marker = completion[len("KILL:"):]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(5)
    return 1.0


def allocates_a_gigabyte(completion: str, gold: str) -> float:
    block = bytearray(1 << 30)
    return float(len(block) > 0)


def spins(completion: str, gold: str) -> float:
    while True:
        pass


def naps(completion: str, gold: str) -> float:
    time.sleep(0.1)
    return 1.0


def segfaults(completion: str, gold: str) -> float:
    os.kill(os.getpid(), signal.SIGSEGV)
    return 1.0


def opens_with_to(completion: str, gold: str) -> float:
    """Learnable from the first token alone: the GRPO run test's reward (SmolLM2 opens with "To" about 1 time in 5)."""
    return 1.0 if completion.lstrip().startswith("To") else 0.0


# Not-a-number results: each must score 0 with status 'error' naming the function (rank1.rewards.registry.call).
def returns_nan(completion: str, gold: str) -> float:
    return float("nan")


def returns_inf(completion: str, gold: str) -> float:
    return float("inf")


def returns_none(completion: str, gold: str):
    return None


def returns_numpy_nan(completion: str, gold: str):
    import numpy  # imported here: only the tests that use it pay for it

    return numpy.float32("nan")  # a numbers.Real (numpy registers its floats), but not finite


def returns_torch_nan(completion: str, gold: str):
    import torch  # imported here: only the tests that use it pay for it (seconds)

    return torch.tensor(float("nan"))  # a 0-d tensor, as a reward computed with torch would be
