"""The one place that reads the scheduler's environment variables.

Stages never read SLURM_* themselves: the runner turns the environment into
a `World` (who am I in a multi-process job) and hands it to the task.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """A task's place in a (possibly multi-node) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = ""
    node: str = ""
    slurm: bool = False  # job_id is a SLURM job's (the local executor's are not): requeue applies

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist (`n[1-4]` -> `n1`), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def world_from_env(env: dict | None = None) -> World:
    """The local executor's variables (DCSLURM_*) or srun's (SLURM_PROCID, ...). The local
    executor's come first: a local run started inside an salloc or srun session inherits
    that job's SLURM_* variables, and its tasks must not take that job's ranks (a rank
    other than 0 commits nothing) or requeue it."""
    env = os.environ if env is None else env
    if "DCSLURM_RANK" in env:
        return World(
            rank=int(env["DCSLURM_RANK"]),
            world_size=int(env["DCSLURM_WORLD_SIZE"]),
            local_rank=int(env.get("DCSLURM_LOCAL_RANK", env["DCSLURM_RANK"])),
            node_rank=0,
            nnodes=1,
            master_addr=env.get("DCSLURM_MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("DCSLURM_MASTER_PORT", 29500)),
            job_id=env.get("DCSLURM_JOB_ID", "local"),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        job_id = env.get("SLURM_JOB_ID", "")
        # A port that differs between jobs sharing a node, stable within a job.
        port = 20000 + int(job_id or 0) % 20000
        return World(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            nnodes=int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1))),
            master_addr=env.get("DCSLURM_MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            master_port=int(env.get("DCSLURM_MASTER_PORT", port)),
            job_id=job_id,
            node=env.get("SLURMD_NODENAME", ""),
            slurm=bool(job_id),
        )
    job_id = env.get("SLURM_JOB_ID", "")  # a batch script's task (array, single): no srun step
    return World(job_id=job_id, node=env.get("SLURMD_NODENAME", ""), slurm=bool(job_id))

