"""The entry point of every task on a compute node.

    python -m dcslurm.core.runner RUN STEP INDEX [--log PATH]

The process started by the executor is a supervisor: it runs the task in a child
(the same command) that leads its own session, and the child runs the task's body,
dcslurm.core.taskrun (read the plan, skip if committed, run, commit the marker).
Exit codes: 0 done or skipped, 2 bad input (one-line error), 1 crash, or a
checkpointable step stopped on the scheduler's request (resumable; see dcslurm.core.task).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dcslurm.core import proctree

STORAGE_ENV = "DCSLURM_STORAGE"  # the run's storage options as JSON (endpoint, profile: never credentials)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcslurm.core.runner")
    parser.add_argument("run")
    parser.add_argument("step")
    parser.add_argument("index", type=int)
    parser.add_argument("--log", default="")
    args = parser.parse_args(argv)
    if proctree.WATCHDOG_ENV not in os.environ:
        # The supervisor: the task runs in a child that leads its own session, so that
        # when it ends (or this process is killed, even by SIGKILL) nothing it started
        # survives it; signals for the task (scancel, --signal USR1) are forwarded.
        proctree.die_with_parent_from_env()  # the local executor's SIGKILL stops its tasks
        return proctree.supervise([sys.executable, "-m", "dcslurm.core.runner",
                                   *(sys.argv[1:] if argv is None else argv)])
    proctree.guard_group()
    # Imported here, not above: the supervisor needs proctree alone, and the task body's
    # imports (plan, storage, fsspec, numpy) cost it 0.15 s of every task's start.
    from dcslurm.core.taskrun import run_task

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_task(args.run, args.step, args.index, args.log)


if __name__ == "__main__":
    sys.exit(main())
