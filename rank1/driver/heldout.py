"""Held-out accuracy inside `rank1 train` (eval section): pass@1 on problems the run never trains on, at
the start, every eval.every steps and at the end, in metrics.jsonl, the run's summary.json and its log.
With eval.k > 1 also the sampled pass@1 (eval.n or eval.k samples at eval.temperature), and from the second
evaluation on, the gain over the first, paired over problems (`rank1 eval --eval.compare_to`'s arithmetic):
the same problems scored twice differ problem by problem, so the gain's interval is far narrower than the
two accuracies' own.

The engines serve the learners' current adapter (a GRPO run's own engines, already in sync; an SFT run
starts one engine group for this) and the reward pool grades correctness alone; the prompts follow how
the run trains (rank1.driver.evaluate.build_eval_set with the run's own config).
"""

from __future__ import annotations

import dataclasses

from rank1.core.workers import init_ray
from rank1.driver.eval_compare import outcome, paired_gains, paired_interval
from rank1.driver.evaluate import sample_count, score_eval_set
from rank1.driver.metrics import log
from rank1.driver.rollouts import lora_rank, push_learner_adapter
from rank1.rewards.pool import RewardPool
from rank1.rollout.actors import EngineGroup
from rank1.rollout.engine import probe_token_ids


class HeldoutEval:
    def __init__(self, cfg, model_path: str, tokenizer, evalset, rollouts=None):
        self.cfg, self.rollouts, self.evalset = cfg, rollouts, evalset
        init_ray(cfg.cluster)
        # A GRPO run's engines already serve the learners' adapter after every sync; an SFT run needs its own.
        self.engines = rollouts.engines if rollouts is not None else EngineGroup.from_config(cfg.rollout, model_path, cfg.seed, cfg.model,
                                                                                                   lora_rank(cfg))
        self.probe_ids, self.last_probes = probe_token_ids(tokenizer), {}
        self.first = {}  # run (None: every run, from step 0) -> (step, per-problem outcomes) of its first evaluation
        try:
            self.rewards = RewardPool(dataclasses.replace(cfg.rewards, functions=["math"], gold_format=self.evalset.gold_format))
        except BaseException:
            self.close()
            raise

    def __call__(self, learners, step: int, run: int | None = None) -> dict:
        from rank1.driver.rollouts import probe_tolerance

        # Every evaluation proves the engines serve the learners' adapter as it is now (for a GRPO run's
        # engines that is the version they already hold: the push costs a probe, not a change). A sweep's
        # `run` is served from its own slot.
        previous = self.last_probes.get(run)
        _, self.last_probes[run] = push_learner_adapter(self.engines, learners, self.probe_ids, probe_tolerance(self.cfg),
                                                        version=step, previous=previous, run=run)
        return self.score(step, run)

    def score(self, step: int, run: int | None = None) -> dict:
        e = self.cfg.eval
        samples = sample_count(e)
        records, summary = score_eval_set(self.engines, self.rewards, self.evalset, self.cfg, samples=samples, progress=False,
                                          slot=run or 0)
        low, high = summary["pass@1_ci95"]
        result = {"heldout_accuracy": summary["pass@1"], "heldout_ci95": summary["pass@1_ci95"], "heldout_problems": summary["problems"]}
        who = "" if run is None else f" of run {run}"
        text = (f"held-out {self.evalset.name} accuracy{who} at step {step}: {100 * summary['pass@1']:.1f} % "
                f"({summary['correct']:.0f}/{summary['problems']}, 95 % interval {100 * low:.1f}-{100 * high:.1f} %)")
        if samples > 1:
            result["heldout_sampled_accuracy"] = summary["sampled_pass@1"]
            text += f"; sampled pass@1 {100 * summary['sampled_pass@1']:.1f} % ({samples} samples at temperature {e.temperature:g})"
        # A sweep evaluates step 0 once for all its runs (they start alike): that first evaluation is every run's.
        first = self.first.get(run) or self.first.get(None)
        if first is None:
            self.first[None if step == 0 else run] = (step, [outcome(r) for r in records])
        else:
            since, outcomes = first
            result["heldout_gain_since_step"] = since
            for metric, g in paired_gains(outcomes, records).items():
                result[f"heldout_gain_{metric}"], result[f"heldout_gain_{metric}_ci95"] = g["value"], g["ci95"]
                text += f"; {metric} {100 * g['value']:+.1f} points since step {since} ({paired_interval(g['ci95'])})"
        log(text)
        return result

    def close(self) -> None:
        if self.rollouts is None and getattr(self, "engines", None) is not None:
            self.engines.shutdown()
        if getattr(self, "rewards", None) is not None:
            self.rewards.close()


class FullModelEval(HeldoutEval):
    """Held-out accuracy of the full fine-tune baseline (adapter.full_finetune): no adapter to push, so
    step 0 scores the base the engines load, and later steps write the whole model and start engines on it."""

    def __init__(self, cfg, model_path: str, tokenizer, evalset, out):
        super().__init__(cfg, model_path, tokenizer, evalset)
        self.folder = out / "eval-model"

    def __call__(self, learners, step: int, run: int | None = None) -> dict:
        if step > 0:
            learners.call("save_adapter", str(self.folder))  # the full learner writes the whole model
            self.engines.shutdown()
            self.engines = EngineGroup.from_config(self.cfg.rollout, str(self.folder), self.cfg.seed, self.cfg.model)
        return self.score(step)
