"""Match the features of two SAE dictionaries (e.g. an SFT adapter's SAE and a GRPO adapter's SAE).

Two latents are the same feature when their decoder rows W_dec[i] (d_in,) point the same way. Rows are
compared by signed cosine (a latent's sign means something: activations are non-negative) and matched one
to one: Hungarian assignment maximising the summed cosine when scipy is importable (it is not a declared
dependency), otherwise greedy by descending cosine. A pair counts as shared when its cosine is above a
threshold chosen against chance: the `quantile` of the matched cosines of random dictionaries of the same
shapes (independent Gaussian rows, unit norm) matched the same way. Isotropic random rows are the
lenient baseline: real dictionaries crowd into the subspace the activations span, where chance cosines are
higher, so a shared pair should also be read with its cosine.
"""

from __future__ import annotations

import torch


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; an all-zero (dead) row stays zero, so it matches nothing."""
    W = W.detach().double()
    return W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _hungarian(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return None
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def _greedy(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy by descending cosine, in rounds of mutual best pairs.

    Greedy's next pick, the largest remaining entry, is always a mutual best pair, and every mutual best
    pair of the remaining rows and columns is picked by greedy before anything that touches it; so taking
    all mutual best pairs at once per round gives greedy's matching in a few vectorised rounds instead of a
    Python loop over a sorted list of every entry (ties break by the lower index, as argmax does)."""
    rows_left, cols_left = torch.arange(cos.shape[0]), torch.arange(cos.shape[1])
    picked_rows, picked_cols = [], []
    while len(rows_left) and len(cols_left):
        sub = cos[rows_left][:, cols_left]
        best_col = sub.argmax(1)
        best_row = sub.argmax(0)
        mutual = best_row[best_col] == torch.arange(len(rows_left))
        picked_rows.append(rows_left[mutual])
        picked_cols.append(cols_left[best_col[mutual]])
        keep_cols = torch.ones(len(cols_left), dtype=torch.bool)
        keep_cols[best_col[mutual]] = False
        rows_left, cols_left = rows_left[~mutual], cols_left[keep_cols]
    if not picked_rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(picked_rows), torch.cat(picked_cols)


def one_to_one(cos: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(rows, cols, method used) of a one-to-one matching of a (d_a, d_b) similarity matrix; min(d_a, d_b) pairs."""
    if method not in ("auto", "hungarian", "greedy"):
        raise ValueError(f"method must be auto, hungarian or greedy, got {method!r}")
    if method != "greedy":
        found = _hungarian(cos)
        if found is not None:
            return found[0], found[1], "hungarian"
        if method == "hungarian":
            raise ImportError("Hungarian matching needs scipy (pip install scipy), or use method='greedy'")
    rows, cols = _greedy(cos)
    return rows, cols, "greedy"


def random_threshold(d_a: int, d_b: int, d_in: int, quantile: float = 0.99, seed: int = 0, trials: int = 3, method: str = "auto") -> float:
    """The `quantile` of matched cosines between random unit-row dictionaries of shapes (d_a, d_in) and (d_b, d_in)."""
    gen = torch.Generator().manual_seed(seed)
    matched = []
    for _ in range(trials):
        A = unit_rows(torch.randn(d_a, d_in, generator=gen, dtype=torch.float64))
        B = unit_rows(torch.randn(d_b, d_in, generator=gen, dtype=torch.float64))
        cos = A @ B.T
        rows, cols, _ = one_to_one(cos, method)
        matched.append(cos[rows, cols])
    return float(torch.quantile(torch.cat(matched), quantile))


def match_dictionaries(W_a: torch.Tensor, W_b: torch.Tensor, seed: int = 0, quantile: float = 0.99, trials: int = 3,
                       method: str = "auto") -> dict:
    """Shared and unique features of two decoders W_dec (d_sae_a, d_in) and (d_sae_b, d_in).

    Returns threshold, pairs [(i, j, cos)] with cos > threshold (best first), unique_a / unique_b (indices
    in no shared pair), their counts and shares, the cosines of every matched pair, and the method used."""
    if W_a.ndim != 2 or W_b.ndim != 2 or W_a.shape[1] != W_b.shape[1]:
        raise ValueError(f"decoders must be (d_sae, d_in) with the same d_in; got {tuple(W_a.shape)} and {tuple(W_b.shape)}")
    if not (torch.isfinite(W_a).all() and torch.isfinite(W_b).all()):
        raise ValueError("a decoder holds NaN or inf values")
    cos = unit_rows(W_a) @ unit_rows(W_b).T
    rows, cols, used = one_to_one(cos, method)
    threshold = random_threshold(W_a.shape[0], W_b.shape[0], W_a.shape[1], quantile, seed, trials, used)
    values = cos[rows, cols]
    shared = values > threshold
    order = values[shared].argsort(descending=True)
    pairs = [(int(i), int(j), float(c)) for i, j, c in zip(rows[shared][order], cols[shared][order], values[shared][order])]
    in_a, in_b = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
    unique_a = [i for i in range(W_a.shape[0]) if i not in in_a]
    unique_b = [j for j in range(W_b.shape[0]) if j not in in_b]
    return {
        "threshold": threshold,
        "quantile": quantile,
        "method": used,
        "pairs": pairs,
        "matched_cosines": sorted(values.tolist(), reverse=True),
        "unique_a": unique_a,
        "unique_b": unique_b,
        "n_shared": len(pairs),
        "n_unique_a": len(unique_a),
        "n_unique_b": len(unique_b),
        "shared_fraction_a": len(pairs) / max(1, W_a.shape[0]),
        "shared_fraction_b": len(pairs) / max(1, W_b.shape[0]),
    }
