"""Worker groups: N workers of one class that the driver calls together (NeMo-RL's RayWorkerGroup, small).

One `WorkerGroup` backs every role: learners (placement group, per-rank arguments, a call on all with
first-failure wait), rollout engines (a placement group per engine for tensor parallelism, work
queued to whichever is free, restarted and retried when one dies or hangs) and reward workers (the
same queue, two chunks in flight each). A group of one learner on the driver's own machine can run in
the driver process instead (`LocalGroup`: no Ray start-up, no serialization).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections import deque
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A worker process of a group died (killed, OOM, node lost) or hung past its deadline during a call."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGroup:
    """One worker living in this process, with the call interface of WorkerGroup."""

    def __init__(self, cls, args: tuple):
        self.workers = [cls(*args)]
        self.size = 1

    def call(self, method: str, *args, per_rank: Sequence[tuple] | None = None) -> list[Any]:
        return [getattr(self.workers[0], method)(*(per_rank[0] if per_rank else args))]

    def node_ids(self) -> list[str]:
        return ["local"]

    def shutdown(self) -> None:
        for w in self.workers:
            if hasattr(w, "close"):
                w.close()
        self.workers = []


class WorkerGroup:
    """`size` Ray actors of `cls`, constructed with `make_args(rank, node_ip_of_each_rank)`.

    placement: a strategy (PACK | SPREAD | STRICT_PACK) for one placement group with a bundle per
    worker, or None for plain actors. gang > 1: each worker gets its own STRICT_PACK group of `gang`
    bundles on one node (a tensor-parallel engine) and runs in bundle 0 holding no GPU itself, so the
    processes it starts (vLLM's Ray workers) take the bundles' GPUs.
    """

    def __init__(self, cls, size: int, make_args: Callable[[int, list[str]], tuple], *, num_cpus: float,
                 num_gpus: float = 0.0, placement: str | None = "PACK", gang: int = 1, max_restarts: int = 0,
                 name: str | None = None, env: dict[str, str] | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name, self.size, self.max_restarts = name or cls.__name__, size, max_restarts
        self.groups: list = []
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        check_capacity(self.name, size * gang, bundle)
        options: list[dict] = []
        if gang > 1:
            for i in range(size):
                pg = self._placement([bundle] * gang, "STRICT_PACK")
                options.append(dict(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)))
        elif placement is not None:
            pg = self._placement([bundle] * size, placement)
            options = [dict(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i)) for i in range(size)]
        else:
            options = [dict(num_cpus=num_cpus, num_gpus=num_gpus)] * size
        ips = [bundle_node_ip(g) for g in self.groups] if gang > 1 else (bundle_node_ips(self.groups[0]) if self.groups else [])
        remote_cls = ray.remote(cls)
        extra = {"runtime_env": {"env_vars": env}} if env else {}
        self.workers = [remote_cls.options(max_restarts=max_restarts, max_task_retries=0, **options[i], **extra)
                        .remote(*make_args(i, ips)) for i in range(size)]
        self.alive = [True] * size
        self.restarts = 0  # tasks re-queued after their worker died or hung

    def _placement(self, bundles: list[dict], strategy: str):
        import ray
        from ray.util.placement_group import placement_group

        pg = placement_group(bundles, strategy=strategy)
        self.groups.append(pg)
        ready, _ = ray.wait([pg.ready()], timeout=float(os.environ.get("RANK1_PLACEMENT_TIMEOUT", 60)))
        if not ready:
            self.shutdown()
            total = ray.cluster_resources()
            raise RuntimeError(f"cannot place {len(bundles)} {self.name} bundle(s) of {bundles[0]} ({strategy}); the cluster has "
                               f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all, possibly not on one node")
        return pg

    # ------------------------------------------------------------ every worker at once

    def call(self, method: str, *args, per_rank: Sequence[tuple] | None = None, only: Sequence[int] | None = None) -> list[Any]:
        """`method` on every worker (rank r gets per_rank[r] when given), or on the ranks in `only`; results in rank order."""
        import ray

        ranks = range(self.size) if only is None else only
        refs = [getattr(self.workers[i], method).remote(*(per_rank[i] if per_rank else args)) for i in ranks]
        try:
            # Wait for whichever finishes first: when a worker dies its peers may hang in a collective
            # waiting for it, so a plain ray.get in rank order could block forever on a live one.
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:  # ActorDiedError, ActorUnavailableError
            raise WorkerDied(f"a {self.name} worker died during {method}: {e}") from e

    # ------------------------------------------------------------ a queue of tasks over the workers

    def map(self, method: str, tasks: Sequence[tuple], *, per_worker: int = 1, retries: int = 2,
            timeout_s: float | None = None, on_restart: Callable[[int], None] | None = None,
            on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        """`method(*task)` for every task on whichever live worker has room; results in task order.

        A worker that dies is restarted by Ray (max_restarts); one whose call runs past `timeout_s` is
        hung and is killed so that Ray restarts it. Either way `on_restart(worker)` runs once the new
        process is up (e.g. to give it the latest adapter) and its unfinished tasks go back to the
        front of the queue, so no task is lost; a task that fails `retries` + 1 times raises WorkerDied.
        """
        import ray

        results: list[Any] = [None] * len(tasks)
        todo, failures = deque(range(len(tasks))), [0] * len(tasks)
        in_flight: dict = {}  # ref -> (task, worker, started)
        load = [0] * self.size
        broken: set[int] = set()
        while todo or in_flight:
            for w in sorted((w for w in range(self.size) if self.alive[w]), key=lambda w: load[w]):
                if w in broken and not any(x == w for _, x, _ in in_flight.values()):
                    self._restore(w, on_restart)
                    broken.discard(w)
                while todo and load[w] < per_worker and w not in broken and self.alive[w]:
                    t = todo.popleft()
                    in_flight[getattr(self.workers[w], method).remote(*tasks[t])] = (t, w, time.monotonic())
                    load[w] += 1
            if not in_flight:
                dead = [w for w in range(self.size) if not self.alive[w]]
                raise WorkerDied(f"{self.name} {dead[0]} died and cannot be restarted (max_restarts={self.max_restarts} used up)"
                                 if len(dead) == 1 else f"every {self.name} died (max_restarts={self.max_restarts} used up)")
            wait = None
            if timeout_s is not None:
                oldest = min(started for _, _, started in in_flight.values())
                wait = max(0.05, oldest + timeout_s - time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait)
            if not ready:  # the oldest call is past its deadline: the worker hangs
                ref = min(in_flight, key=lambda r: in_flight[r][2])
                t, w, _ = in_flight[ref]
                logger.warning("%s %d hung for over %.0f s; killing it so Ray restarts it", self.name, w, timeout_s)
                ray.kill(self.workers[w], no_restart=False)
                ready = [ref]
            ref = ready[0]
            t, w, _ = in_flight.pop(ref)
            load[w] -= 1
            try:
                results[t] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                failures[t] += 1
                if failures[t] > retries:
                    raise WorkerDied(f"{self.name} task {t} failed {failures[t]} times; last: {e}") from e
                logger.warning("%s %d died; its task %d goes back to the queue", self.name, w, t)
                self.restarts += 1
                broken.add(w)
                todo.appendleft(t)
                continue
            if on_result is not None:
                on_result(t, results[t])
        return results

    def _restore(self, w: int, on_restart: Callable[[int], None] | None, timeout_s: float = 600.0) -> None:
        """Wait until Ray has the worker's new process up, then let the caller bring it up to date."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.workers[w].__ray_ready__.options(max_task_retries=-1).remote(), timeout=timeout_s)
                break
            except ray.exceptions.ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            except ray.exceptions.ActorDiedError:
                self.alive[w] = False
                return
        if on_restart is not None:
            on_restart(w)

    # ------------------------------------------------------------ bookkeeping

    def run_on(self, w: int, fn: Callable, *args) -> Any:
        """fn(worker instance, *args) inside worker w (Ray's __ray_call__)."""
        import ray

        return ray.get(self.workers[w].__ray_call__.remote(fn, *args))

    def pids(self, timeout_s: float = 120.0) -> list[int]:
        """Process ids of the workers, waiting for any that Ray is restarting."""
        import ray

        refs = [w.__ray_call__.options(max_task_retries=-1).remote(_pid) for w in self.workers]
        return ray.get(refs, timeout=timeout_s)

    def node_ids(self) -> list[str]:
        import ray

        return ray.get([w.__ray_call__.remote(_node_id) for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        for pg in self.groups:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:
                pass
        self.workers, self.groups = [], []


def _pid(_self) -> int:
    return os.getpid()


def _node_id(_self) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def check_capacity(name: str, bundles: int, bundle: dict) -> None:
    """Fail now, naming the resource, when the cluster can never hold the bundles (Ray would wait forever)."""
    import ray

    total = ray.cluster_resources()
    for kind, each in bundle.items():
        if each and bundles * each > total.get(kind, 0):
            unit = "GPUs" if kind == "GPU" else "CPUs"
            raise RuntimeError(
                f"cannot place {bundles} {name} bundle(s) of {each:g} {kind} each: they need {bundles * each:g} {unit}, the "
                f"cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all"
            )


def bundle_node_ips(pg) -> list[str]:
    import ray
    from ray.util import placement_group_table

    node_of_bundle = placement_group_table(pg)["bundles_to_node_id"]
    ip_of_node = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return [ip_of_node[node_of_bundle[i]] for i in range(len(node_of_bundle))]


def bundle_node_ip(pg) -> str:
    return bundle_node_ips(pg)[0]


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
    local = {}
    if not address:
        local = {"num_cpus": cluster.local_num_cpus, "object_store_memory": cluster.local_object_store_mb << 20}
        if cluster.local_num_gpus:  # declared GPUs (a simulated GPU node): Ray then sets CUDA_VISIBLE_DEVICES per actor
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            local["num_gpus"] = cluster.local_num_gpus
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
