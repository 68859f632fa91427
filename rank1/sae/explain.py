"""`rank1 sae explain`: an LLM explains each feature from its top examples, then is scored.

* explanation + self-rating: the client sees the even-ranked top examples (activating tokens marked
  with their value) and answers with a one-line explanation and a 1-5 rating of how consistently the
  examples fit it (the paper's self-rating).
* detection accuracy: on held-out examples — odd-ranked top examples (positives) and random tokens
  where the feature is 0 (negatives), shuffled — the client says for each whether the explanation
  applies; accuracy is the fraction it gets right (0.5 = chance).
"""

from __future__ import annotations

import json
import random
import re
import dataclasses

from tqdm.auto import tqdm

from rank1.core.config import SAEExplainConfig
from rank1.sae.clients import ChatClient

SYSTEM = "You are an interpretability researcher explaining features of a language model."


def render(example: dict, vocab: dict, mark: bool) -> str:
    """Example text; with `mark`, tokens where the feature is active are wrapped as <<token>>(value)."""
    parts = []
    values = example.get("values") or [0.0] * len(example["tokens"])
    peak = max(values) if values else 0.0
    for token, value in zip(example["tokens"], values):
        text = vocab.get(str(token), "")
        parts.append(f"<<{text}>>({value:.2f})" if mark and value > 0 and value >= 0.3 * peak else text)
    return "".join(parts).replace("\n", "\\n")


def explanation_prompt(feature: dict, examples: list[dict], vocab: dict) -> list[dict]:
    shown = "\n".join(f"{i + 1}. {render(e, vocab, mark=True)}" for i, e in enumerate(examples))
    user = (
        f"Below are text excerpts where a feature of a language model is most active. Active tokens are "
        f"marked <<like this>>(activation).\n\n{shown}\n\n"
        "What does the feature respond to? Answer in exactly two lines:\n"
        "EXPLANATION: <one short sentence>\n"
        "RATING: <1-5, how consistently all examples fit your explanation (5 = all clearly)>"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def detection_prompt(explanation: str, examples: list[dict], vocab: dict) -> list[dict]:
    shown = "\n".join(f"{i + 1}. {render(e, vocab, mark=False)}" for i, e in enumerate(examples))
    user = (
        f"A feature of a language model is explained as: \"{explanation}\"\n\nFor each excerpt below, would the "
        f"feature be active on some token of it?\n\n{shown}\n\n"
        f"Answer with a JSON list of {len(examples)} numbers, 1 for yes and 0 for no, and nothing else."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(reply: str) -> tuple[str, int | None]:
    explanation = re.search(r"EXPLANATION:\s*(.+)", reply)
    rating = re.search(r"RATING:\s*([1-5])", reply)
    text = explanation.group(1).strip() if explanation else reply.strip().splitlines()[0] if reply.strip() else ""
    return text, int(rating.group(1)) if rating else None


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


def explain_feature(client: ChatClient, feature: dict, data: dict, settings: SAEExplainConfig, rng: random.Random) -> dict:
    examples, vocab = feature["examples"], data["vocab"]
    result = {"id": feature["id"], "source": feature["source"], "explanation": None, "self_rating": None, "detection_accuracy": None}
    if not examples:
        return {**result, "skipped": "the feature never activates"}
    reply = client.complete(explanation_prompt(feature, examples[0::2][: settings.n_explain], vocab), settings.max_tokens)
    result["explanation"], result["self_rating"] = parse_explanation(reply)
    positives = examples[1::2][: settings.n_score]
    pool = data["random_pool"]
    negatives = [pool[i] for i, v in enumerate(feature["random_values"]) if v == 0]
    rng.shuffle(negatives)
    negatives = negatives[: len(positives)]
    trials = [(e, 1) for e in positives] + [(e, 0) for e in negatives]
    rng.shuffle(trials)
    if not trials:
        return result
    reply = client.complete(detection_prompt(result["explanation"], [e for e, _ in trials], vocab), settings.max_tokens)
    predictions = parse_predictions(reply, len(trials))
    if predictions is None:
        return {**result, "detection_error": "could not parse the detection reply"}
    result["detection_accuracy"] = sum(p == label for p, (_, label) in zip(predictions, trials)) / len(trials)
    result["n_scored"] = len(trials)
    return result


def explain_all(client: ChatClient, data: dict, settings: SAEExplainConfig, seed: int = 0, progress: bool = True) -> dict:
    rng = random.Random(seed)
    features, per_source = [], {}
    for f in data["features"]:  # the first max_features of each source (adapter, latent, neuron)
        per_source[f["source"]] = per_source.get(f["source"], 0) + 1
        if settings.max_features is None or per_source[f["source"]] <= settings.max_features:
            features.append(f)
    results = [explain_feature(client, f, data, settings, rng) for f in tqdm(features, disable=not progress, desc="explain")]
    return {"client": client.describe(), "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("api_key_env",)} | {"seed": seed}, "explanations": results}
