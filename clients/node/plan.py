"""Which workers a node runs: for each ``[[workers]]`` spec, one worker per GPU, or per group
of ``gpus_per_worker`` GPUs, with only that group visible to it; on a host with no GPU,
``count`` replicas.

Worker ids say where a worker runs: ``{node}-{spec id or model}-gpu{i}`` (``i``: the first
GPU of its group, as the host numbers it) or ``{node}-{spec id or model}-cpu{i}``. Specs are
otherwise passed on as configured (``n_gpu_layers`` included: pinning a GPU offloads nothing
by itself).
"""

from __future__ import annotations

import msgspec

from tokenhive.clients.node.gpus import VISIBLE_ENV, Gpu
from tokenhive.clients.pool.pool import replica_specs
from tokenhive.schemas.config import AnyWorkerSpec, ConfigError

NODE_ENV = "TOKENHIVE_NODE"  # read by the worker (WorkerConfig.node -> Ready.node)


class WorkerPlan(msgspec.Struct, frozen=True):
    worker_id: str
    spec: AnyWorkerSpec  # id = worker_id, count = 1, gpus = [] (the env pins it)
    env: dict[str, str]  # the spec's env, TOKENHIVE_NODE and CUDA_VISIBLE_DEVICES
    gpus: tuple[int, ...] = ()  # host indexes of the GPUs it sees; () on the CPU


class NodePlan(msgspec.Struct, frozen=True):
    workers: list[WorkerPlan]
    notes: list[str] = msgspec.field(default_factory=list)  # worth a log line: GPUs left idle...

    def pinned(self) -> dict[int, list[str]]:
        """GPU index -> the worker ids that see it."""
        out: dict[int, list[str]] = {}
        for plan in self.workers:
            for index in plan.gpus:
                out.setdefault(index, []).append(plan.worker_id)
        return out


def plan_workers(node: str, specs: list[AnyWorkerSpec], gpus: list[Gpu],
                 gpus_per_worker: int = 1) -> NodePlan:
    """The workers for ``specs`` on a host with ``gpus``; ConfigError when they cannot be
    placed (a spec's ``gpus`` naming a GPU this host lacks, too few GPUs for one worker,
    two workers with one id)."""
    if gpus_per_worker < 1:
        raise ConfigError(f"gpus_per_worker must be >= 1, got {gpus_per_worker}")
    workers: list[WorkerPlan] = []
    notes: list[str] = []
    for i, spec in enumerate(specs):
        name = spec.id or spec.model
        where = f"workers[{i}] ({name})"
        if gpus:
            groups, left = _gpu_groups(where, spec, gpus, gpus_per_worker)
            if spec.count > 1:
                notes.append(f"{where}: count = {spec.count} is for hosts without a GPU; "
                             "here it runs one worker per GPU group")
            if left:
                notes.append(f"{where}: GPU {', '.join(str(g.index) for g in left)} left "
                              f"without a worker ({gpus_per_worker} per worker)")
            for group in groups:
                env = {**spec.env, NODE_ENV: node,
                       VISIBLE_ENV: ",".join(g.device for g in group)}
                workers.append(_plan(f"{node}-{name}-gpu{group[0].index}", spec, env,
                                     tuple(g.index for g in group)))
        else:
            if spec.gpus:
                raise ConfigError(f"{where}: gpus = {spec.gpus}, but this host has no GPU "
                                  "(none found; see the log line above)")
            for n, (replica, env) in enumerate(replica_specs(spec)):
                workers.append(_plan(f"{node}-{name}-cpu{n}", replica, {**env, NODE_ENV: node},
                                     ()))
    ids = [w.worker_id for w in workers]
    if twice := sorted({w for w in ids if ids.count(w) > 1}):
        raise ConfigError(f"two workers would get the id {', '.join(twice)}: give the specs "
                          "of one model distinct `id`s")
    return NodePlan(workers, notes)


def _gpu_groups(where: str, spec: AnyWorkerSpec, gpus: list[Gpu],
                per_worker: int) -> tuple[list[list[Gpu]], list[Gpu]]:
    """The spec's GPUs (all, or those its ``gpus`` names) cut into groups of ``per_worker``;
    the GPUs left over."""
    mine = gpus
    if spec.gpus:
        by_index = {g.index: g for g in gpus}
        missing = [g for g in spec.gpus if g not in by_index]
        if missing:
            raise ConfigError(f"{where}: gpus = {spec.gpus}, but this host has no GPU "
                              f"{', '.join(map(str, missing))} (it has "
                              f"{', '.join(str(g.index) for g in gpus)})")
        mine = [by_index[g] for g in dict.fromkeys(spec.gpus)]
    if len(mine) < per_worker:
        raise ConfigError(f"{where}: gpus_per_worker = {per_worker}, but only {len(mine)} "
                          f"GPU{'s' if len(mine) != 1 else ''} to use")
    whole = len(mine) - len(mine) % per_worker
    groups = [mine[i:i + per_worker] for i in range(0, whole, per_worker)]
    return groups, mine[whole:]


def _plan(worker_id: str, spec: AnyWorkerSpec, env: dict[str, str],
          gpus: tuple[int, ...]) -> WorkerPlan:
    pinned = msgspec.structs.replace(spec, id=worker_id, count=1, gpus=[])
    return WorkerPlan(worker_id, pinned, env, gpus)
