"""`rank1 sae explain`: an LLM explains each feature from its top examples, then a judge scores the explanation.

Examples are one window per document (analyze keeps the best token of each document; older analyses are
deduplicated here). The explanation set is the even-ranked examples; the scoring set is the odd-ranked ones
plus random windows that are silent (the feature's maximum over the whole window is 0), and no document is
on both sides: a scoring window whose document is in the explanation set is dropped.

* explanation + self-rating: the explainer sees the explanation set (active tokens marked with their value)
  and answers with a one-line explanation and a 1-5 rating of how consistently the examples fit it (the
  paper's self-rating).
* detection and fuzzing scores on the scoring set: scorers.py.
"""

from __future__ import annotations

import dataclasses
import random
import re

from tqdm.auto import tqdm

from rank1.core.config import SAEExplainConfig
from rank1.sae.clients import ChatClient
from rank1.sae.scorers import SYSTEM, active_positions, detection, fuzzing, render


def explanation_prompt(examples: list[dict], vocab: dict) -> list[dict]:
    shown = "\n".join(f"{i + 1}. {render(e, vocab, active_positions(e), show_values=True)}" for i, e in enumerate(examples))
    user = (
        f"Below are text excerpts where a feature of a language model is most active. Active tokens are "
        f"marked <<like this>>(activation).\n\n{shown}\n\n"
        "What does the feature respond to? Answer in exactly two lines:\n"
        "EXPLANATION: <one short sentence>\n"
        "RATING: <1-5, how consistently all examples fit your explanation (5 = all clearly)>"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(reply: str) -> tuple[str, int | None]:
    explanation = re.search(r"EXPLANATION:\s*(.+)", reply)
    rating = re.search(r"RATING:\s*([1-5])", reply)
    text = explanation.group(1).strip() if explanation else reply.strip().splitlines()[0] if reply.strip() else ""
    return text, int(rating.group(1)) if rating else None


def one_per_document(examples: list[dict]) -> list[dict]:
    """The first (best) example of each document, in order."""
    seen: set[int] = set()
    return [e for e in examples if not (e["doc"] in seen or seen.add(e["doc"]))]


def split_by_document(feature: dict, pool: list[dict], settings: SAEExplainConfig, rng: random.Random) -> tuple[list, list, list]:
    """(explanation set, held-out positives, silent negatives); no document in the first and the others."""
    examples = one_per_document(feature["examples"])
    explain = examples[0::2][: settings.n_explain]
    taken = {e["doc"] for e in explain}
    positives = [e for e in examples[1::2] if e["doc"] not in taken][: settings.n_score]
    silent = [e for e, peak in zip(pool, feature["random_window_max"]) if peak == 0 and e["doc"] not in taken]
    rng.shuffle(silent)
    return explain, positives, one_per_document(silent)[: settings.n_score]


def explain_feature(client: ChatClient, feature: dict, data: dict, settings: SAEExplainConfig, rng: random.Random) -> dict:
    vocab = data["vocab"]
    result = {"id": feature["id"], "source": feature["source"], "explanation": None, "self_rating": None,
              "detection_accuracy": None, "fuzzing_accuracy": None, "explain_docs": [], "detection": [], "fuzzing": []}
    if not feature["examples"]:
        return {**result, "skipped": "the feature never activates"}
    explain, positives, negatives = split_by_document(feature, data["random_pool"], settings, rng)
    reply = client.complete(explanation_prompt(explain, vocab), settings.max_tokens)
    result["explanation"], result["self_rating"] = parse_explanation(reply)
    result["explain_docs"] = [e["doc"] for e in explain]
    result.update(detection(client, result["explanation"], positives, negatives, vocab, rng, settings.max_tokens))
    result.update(fuzzing(client, result["explanation"], positives, vocab, rng, settings.max_tokens))
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
