"""SAE training trend on a real collection: FVU on the training batches and on a held-out shard, per log record.

    python benchmarks/sae_fvu_trend.py --activations DIR [--train-tokens 2000000] [--seeds 0 1 2] [--set k=4 ...]

The collection's last shard is held out (whole documents); the SAE trains on the others with `rank1 sae
train`'s settings (the defaults unless --set changes them) and the same passes over the data. Printed as
JSON: per seed the first and last FVU, the largest FVU over the last third of the log (a late blow-up shows
there), held-out FVU at the end, L0 and dead fraction, and the whole curve.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from rank1.core.config_commands import SAETrainConfig
from rank1.sae.sae import SparseAutoencoder
from rank1.sae.store import ActivationStore
from rank1.sae.train import sae_config
from rank1.sae.trainer import evaluate_reconstruction, train_sae


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--activations", required=True)
    p.add_argument("--train-tokens", type=int, default=SAETrainConfig.train_tokens)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", nargs="*", default=[], help="other SAETrainConfig fields as name=value (YAML scalars)")
    args = p.parse_args()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = SAETrainConfig(train_tokens=args.train_tokens, effect=False, **overrides)
    store = ActivationStore(args.activations)
    last = store.load_shard(len(store.shards) - 1)
    held_out = last["adapter"][store.kept(last["positions"])]
    store.shards, store.offsets = store.shards[:-1], store.offsets[:-1]  # train on the others
    per_pass = store.n_kept // cfg.batch_size
    passes = max(1, math.ceil(cfg.train_tokens / (per_pass * cfg.batch_size)))
    out = {"activations": args.activations, "train_tokens": store.n_kept, "held_out_tokens": len(held_out), "passes": passes,
           "settings": {k: getattr(cfg, k) for k in ("k", "expansion", "lr", "batch_size", "warmup_steps", "dead_after_tokens")}, "seeds": {}}
    for seed in args.seeds:
        torch.manual_seed(seed)
        sae = SparseAutoencoder(sae_config(cfg, len(store.adapter_names)), seed=seed)
        stream = itertools.chain.from_iterable(store.batches(cfg.batch_size, seed=seed + i) for i in range(passes))
        state = train_sae(sae, stream, cfg, total_steps=per_pass * passes, progress=False,
                          evaluate=lambda s: {"heldout_fvu": evaluate_reconstruction(s, [held_out])["fvu"]})
        curve = [{k: round(r[k], 4) for k in ("step", "fvu", "heldout_fvu", "l0", "dead_fraction")} for r in state.history]
        late = curve[-max(1, len(curve) // 3) :]
        out["seeds"][seed] = {"first_fvu": curve[0]["fvu"], "last_fvu": curve[-1]["fvu"], "late_max_fvu": max(r["fvu"] for r in late),
                              "heldout_fvu": curve[-1]["heldout_fvu"], "l0": curve[-1]["l0"], "dead_fraction": curve[-1]["dead_fraction"],
                              "curve": curve}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
