"""`rank1 train --dry-run`: place every actor group on the cluster it would use, load nothing, report.

Learners, rollout engines (with their tensor-parallel bundles) and reward workers are placed exactly
as a run places them (same rank1.core.workers.WorkerGroup, resources and strategy), but each actor is a
probe that reports its node, the devices Ray let it see, the device it would use (the learners' rule,
rank1.trainer.devices) and its rank; its memory share comes from `rank1 plan`'s model of the recipe
(model configs from rank1's shipped copies or a local folder: no weights, no data, no network). A
cluster that cannot hold the job fails naming the missing resource; two actors on one GPU fail unless
the config gives fractional GPUs.
"""

from __future__ import annotations

from pathlib import Path

from rank1.core.config import Config, ConfigError
from rank1.core.workers import WorkerGroup, init_ray
from rank1.driver.metrics import log
from rank1.trainer.devices import placement_report


class LearnerProbe:
    def __init__(self, placement):
        self.placement = placement

    def report(self) -> dict:
        return {**placement_report(), "rank": self.placement.rank, "node_rank": self.placement.node_rank}


class EngineProbe:
    """Stands in for one engine; with tensor parallelism, probes each GPU bundle of its placement group."""

    def __init__(self, gpus_per_rank: float, ranks: int):
        self.gpus_per_rank, self.ranks = gpus_per_rank, ranks

    def report(self) -> dict:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        report = placement_report()
        if self.ranks > 1:
            pg = ray.util.get_current_placement_group()
            probe = ray.remote(num_cpus=0, num_gpus=self.gpus_per_rank)(placement_report)
            report["tp_ranks"] = ray.get([probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i)).remote() for i in range(self.ranks)])
        return report


class RewardProbe:
    def report(self) -> dict:
        return placement_report()


def _gpus(report: dict) -> list[tuple[str, str]]:
    return [(report.get("node_id", ""), g) for g in report["gpu_ids"]]


def dry_run(cfg: Config, objective) -> Path:
    """Place the job's actors, print who sits where, and check that no two share a GPU they were not told to."""
    from rank1.driver.plan import GB, plan_recipe
    from rank1.driver.run import make_learners

    init_ray(cfg.cluster)
    import ray

    r, c = cfg.rollout, cfg.cluster
    groups = []
    try:
        learners = make_learners(cfg, "", 1, objective, actor_cls=LearnerProbe)
        groups.append(learners)
        rows = [("learner", i, rep) for i, rep in enumerate(learners.call("report"))]
        if objective.rollout_engines:
            from rank1.driver.rollouts import check_engine_resources

            check_engine_resources(cfg, ray.cluster_resources().get("GPU", 0))
            engines = WorkerGroup(EngineProbe, r.num_engines, lambda i, ips: (r.gpus_per_engine, r.tensor_parallel_size),
                                  num_cpus=r.cpus_per_engine, num_gpus=r.gpus_per_engine, placement=None,
                                  gang=r.tensor_parallel_size, name="rollout engine")
            groups.append(engines)
            rows += [("engine", i, rep) for i, rep in enumerate(engines.call("report"))]
            rewards = WorkerGroup(RewardProbe, cfg.rewards.num_workers, lambda i, ips: (), num_cpus=0, placement=None, name="reward worker")
            groups.append(rewards)
            rows += [("reward", i, rep) for i, rep in enumerate(rewards.call("report"))]
    finally:
        for group in groups:
            group.shutdown()

    try:
        plan = plan_recipe(cfg)
        learner_gb = f"{plan.total / GB:.1f}"
        engine_gb = f"{(plan.engines.weights + plan.engines.overhead + plan.engines.kv_cache) / GB:.1f}" if plan.engines else "-"
    except (ValueError, OSError) as e:  # a model rank1 has no config for: placement is still checked
        log(f"no memory plan ({e})")
        learner_gb = engine_gb = "?"
    lines = [f"{'actor':<10} {'rank':>4} {'local':>5}  {'node':<14} {'CUDA_VISIBLE_DEVICES':<22} {'device':<8} {'GB':>6}"]
    for role, i, rep in rows:
        ranks = rep.get("tp_ranks") or [rep]
        visible = ",".join(x["cuda_visible_devices"] or "-" for x in ranks)
        device = rep["device"] if role == "learner" and cfg.trainer.device != "cpu" else ("cpu" if role != "engine" else
                 (f"{len(ranks)}×cuda" if any(x["gpu_ids"] for x in ranks) else "cpu"))
        gb = learner_gb if role == "learner" else engine_gb if role == "engine" else "-"
        local = rep.get("node_rank", "-")  # a learner's rank among those on its node (its LOCAL_RANK is its device index)
        lines.append(f"{role:<10} {i:>4} {local:>5}  {rep.get('node_id', '')[:12]:<14} {visible:<22} {device:<8} {gb:>6}")
    print("\n".join(lines))
    held = [g for role, _, rep in rows for x in (rep.get("tp_ranks") or [rep]) for g in _gpus(x)]
    fractional = any(0 < v < 1 for v in (c.gpus_per_learner, r.gpus_per_engine))
    if len(held) != len(set(held)) and not fractional:
        raise ConfigError(f"dry run: {len(held) - len(set(held))} GPU(s) are held by two actors; give every learner and "
                          "engine rank a whole GPU (cluster.gpus_per_learner, rollout.gpus_per_engine)")
    total = ray.cluster_resources()
    print(f"\ndry run: {len(rows)} actors placed on a cluster of {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; "
          f"{len(held)} GPUs held, none shared. Nothing was loaded.")
    ray.shutdown()
    return Path(cfg.logging.output_dir or ".")
