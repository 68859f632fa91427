"""Actor groups: N workers of one class that the driver calls together (in the spirit of NeMo-RL's
worker groups).

A group of one on the driver's own machine runs in the driver process (no Ray start-up, no
serialization); anything larger is a set of Ray actors placed by a placement group, one bundle per
worker, PACK (fill a node first) or SPREAD (across nodes).
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any, Sequence


class WorkerDied(RuntimeError):
    """A worker process of a group died (killed, OOM, node lost) during a call."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGroup:
    """One worker living in this process."""

    def __init__(self, cls, args: tuple):
        self.workers = [cls(*args)]
        self.size = 1

    def call(self, method: str, *args, per_rank: Sequence[tuple] | None = None) -> list[Any]:
        worker = self.workers[0]
        return [getattr(worker, method)(*(per_rank[0] if per_rank else args))]

    def shutdown(self) -> None:
        for w in self.workers:
            if hasattr(w, "close"):
                w.close()
        self.workers = []


class RayGroup:
    """`size` Ray actors of `cls`, constructed with `make_args(rank, node_ip_of_each_rank)`."""

    def __init__(self, cls, size: int, make_args, *, num_cpus: float, num_gpus: float, strategy: str = "PACK"):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})} for _ in range(size)]
        total = ray.cluster_resources()
        for kind, each in bundles[0].items():
            if size * each > total.get(kind, 0):  # can never be placed: fail now instead of waiting
                raise RuntimeError(
                    f"cannot place {size} workers of {bundles[0]} each: the cluster has {total.get('CPU', 0):g} CPUs "
                    f"and {total.get('GPU', 0):g} GPUs in all"
                )
        self.pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=float(os.environ.get("RANK1_PLACEMENT_TIMEOUT", 60)))
        if not ready:
            total = ray.cluster_resources()
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"cannot place {size} workers of {bundles[0]} each ({strategy}); the cluster has "
                f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all"
            )
        ips = bundle_node_ips(self.pg)
        remote_cls = ray.remote(cls)
        self.workers = [
            remote_cls.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*make_args(i, ips))
            for i in range(size)
        ]
        self.size = size

    def call(self, method: str, *args, per_rank: Sequence[tuple] | None = None) -> list[Any]:
        import ray

        refs = [getattr(w, method).remote(*(per_rank[i] if per_rank else args)) for i, w in enumerate(self.workers)]
        try:
            # Wait for whichever finishes first: when a worker dies its peers may hang in a collective
            # waiting for it, so a plain ray.get in rank order could block forever on a live one.
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise WorkerDied(f"a {type(self.workers[0]).__name__} worker died during {method}: {e}") from e

    def node_ids(self) -> list[str]:
        from ray.util import placement_group_table

        return [placement_group_table(self.pg)["bundles_to_node_id"][i] for i in range(self.size)]

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # already dead
                pass
        ray.util.remove_placement_group(self.pg)
        self.workers = []


def bundle_node_ips(pg) -> list[str]:
    import ray
    from ray.util import placement_group_table

    node_of_bundle = placement_group_table(pg)["bundles_to_node_id"]
    ip_of_node = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return [ip_of_node[node_of_bundle[i]] for i in range(len(node_of_bundle))]


def rendezvous_port(ip: str) -> int:
    """A port for the learners' process group: checked free when the driver is on that node."""
    local_ips = {"127.0.0.1", socket.gethostbyname(socket.gethostname())}
    try:
        import ray

        local_ips.add(ray.util.get_node_ip_address())
    except Exception:
        pass
    return free_port() if ip in local_ips else random.randint(20000, 40000)


def init_ray(cluster) -> None:
    """Attach to the cluster at cluster.address (or RAY_ADDRESS); otherwise start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        check_reachable(address)  # ray.init retries an unreachable address for many minutes
    local = {} if address else {"num_cpus": cluster.local_num_cpus, "object_store_memory": cluster.local_object_store_mb << 20}
    try:
        # "local" always starts a new instance; None would attach to whatever cluster a stale
        # /tmp/ray/ray_current_cluster file names.
        ray.init(address=address or "local", include_dashboard=False, ignore_reinit_error=True, **local)
    except ConnectionError as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address!r} (cluster.address / RAY_ADDRESS): {e}") from None


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address!r} (cluster.address / RAY_ADDRESS): {e}") from None
