"""Scoring an explanation on held-out windows with an LLM judge: detection and fuzzing (as delphi defines them).

* detection: held-out windows where the feature fires (positives) and random windows where its maximum over
  the whole window is 0 (negatives: no token of them is active), shuffled; the judge says for each whether
  the feature would be active on some token of it. Score: balanced accuracy (mean recall of both classes),
  so 0.5 is chance whatever the class sizes.
* fuzzing: held-out activating windows with tokens marked, half of them correctly (the tokens where the
  feature is active, as the explainer saw them marked) and half at random (as many tokens, chosen among
  the others); the judge says for each whether the marked tokens are what the explanation describes.
  Score: balanced accuracy of correct vs random marking (delphi's "fuzz" with the active-example variant:
  it tests whether the explanation says *where* in a text the feature fires, not only *which* texts).
Every trial (window, label, the judge's answer; the marked positions for fuzzing) is returned, so a score
can be checked by hand.
"""

from __future__ import annotations

import json
import random
import re

from rank1.sae.clients import ChatClient

SYSTEM = "You are an interpretability researcher explaining features of a language model."
HIGHLIGHT_FRACTION = 0.3  # a token is "active" for marking when its value is > 0 and ≥ this share of the window's peak


def active_positions(example: dict) -> list[int]:
    """Positions of the window's tokens marked as active: value > 0 and ≥ HIGHLIGHT_FRACTION of the window's peak."""
    values = example.get("values") or []
    peak = max(values, default=0.0)
    return [i for i, v in enumerate(values) if v > 0 and v >= HIGHLIGHT_FRACTION * peak]


def render(example: dict, vocab: dict, marked=(), show_values: bool = False) -> str:
    """Window text with the tokens at `marked` wrapped as <<token>> (followed by (value) with show_values)."""
    marked, values = set(marked), example.get("values") or [0.0] * len(example["tokens"])
    parts = []
    for i, (token, value) in enumerate(zip(example["tokens"], values)):
        text = vocab.get(str(token), "")
        parts.append((f"<<{text}>>({value:.2f})" if show_values else f"<<{text}>>") if i in marked else text)
    return "".join(parts).replace("\n", "\\n")


def parse_predictions(reply: str, n: int) -> list[int] | None:
    match = re.search(r"\[[^\]]*\]", reply)
    if not match:
        return None
    try:
        values = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if len(values) != n or any(v not in (0, 1, True, False) for v in values):
        return None
    return [int(v) for v in values]


def balanced_accuracy(predictions: list[int], labels: list[int]) -> float | None:
    """Mean of the recall on label 1 and on label 0; None unless both labels occur."""
    recalls = []
    for label in (1, 0):
        hits = [p == label for p, y in zip(predictions, labels) if y == label]
        if not hits:
            return None
        recalls.append(sum(hits) / len(hits))
    return sum(recalls) / 2


def _ask(client: ChatClient, question: str, excerpts: list[str], max_tokens: int) -> list[int] | None:
    shown = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(excerpts))
    user = f"{question}\n\n{shown}\n\nAnswer with a JSON list of {len(excerpts)} numbers, 1 for yes and 0 for no, and nothing else."
    return parse_predictions(client.complete([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], max_tokens), len(excerpts))


def _scored(name: str, trials: list[dict], predictions: list[int] | None) -> dict:
    if predictions is None:
        return {f"{name}_accuracy": None, f"{name}_error": "could not parse the judge's reply", name: trials}
    for trial, p in zip(trials, predictions):
        trial["prediction"] = p
    return {f"{name}_accuracy": balanced_accuracy(predictions, [t["label"] for t in trials]), name: trials}


def detection(client: ChatClient, explanation: str, positives: list[dict], negatives: list[dict], vocab: dict,
              rng: random.Random, max_tokens: int) -> dict:
    """detection_accuracy and the trials [{index, doc, label, prediction}] (index: the window's centre token)."""
    if not positives or not negatives:
        why = "no positive window" if not positives else "no random window where the feature is silent"
        return {"detection_accuracy": None, "detection_error": why, "detection": []}
    trials = [(e, 1) for e in positives] + [(e, 0) for e in negatives]
    rng.shuffle(trials)
    question = (f"A feature of a language model is explained as: \"{explanation}\"\n\n"
                "For each excerpt below, would the feature be active on some token of it?")
    predictions = _ask(client, question, [render(e, vocab) for e, _ in trials], max_tokens)
    return _scored("detection", [{"index": e["index"], "doc": e["doc"], "label": y} for e, y in trials], predictions)


def random_marks(example: dict, rng: random.Random) -> list[int] | None:
    """As many positions as active_positions, drawn among the other tokens; None when there are too few others."""
    correct = set(active_positions(example))
    others = [i for i in range(len(example["tokens"])) if i not in correct]
    if not correct or len(others) < len(correct):
        return None
    return sorted(rng.sample(others, len(correct)))


def fuzzing(client: ChatClient, explanation: str, windows: list[dict], vocab: dict, rng: random.Random, max_tokens: int) -> dict:
    """fuzzing_accuracy and the trials [{index, doc, label (1 = correctly marked), marked, prediction}]."""
    windows = list(windows)
    rng.shuffle(windows)
    # Half the windows (those with enough unmarked tokens to draw from) are marked at random, the others
    # correctly; the two groups differ in size by at most one.
    wrong = {}
    for i, e in enumerate(windows):
        marks = random_marks(e, rng) if len(wrong) < len(windows) // 2 else None
        if marks is not None:
            wrong[i] = marks
    correct = [i for i in range(len(windows)) if i not in wrong][: len(wrong) + 1]
    trials = [{"index": windows[i]["index"], "doc": windows[i]["doc"], "label": int(i not in wrong),
               "marked": wrong.get(i) or active_positions(windows[i]), "_example": windows[i]} for i in sorted([*wrong, *correct])]
    rng.shuffle(trials)
    if not any(t["label"] == 0 for t in trials):
        return {"fuzzing_accuracy": None, "fuzzing_error": "too few held-out windows to mark at random", "fuzzing": []}
    question = (f"A feature of a language model is explained as: \"{explanation}\"\n\n"
                "In each excerpt below some tokens are marked <<like this>>. Are the marked tokens exactly the ones "
                "the explanation says the feature is active on?")
    predictions = _ask(client, question, [render(t.pop("_example"), vocab, t["marked"]) for t in trials], max_tokens)
    return _scored("fuzzing", trials, predictions)
