"""Render a step's tasks as a plain sbatch script (pure: strings in, string out).

Every value from the config or a path goes into the bash body through
`shlex.quote`; in `#SBATCH` lines (parsed by sbatch, not by a shell) values
are double-quoted, and a value that sbatch cannot represent (a newline or a
double quote) is refused with a one-line error, so nothing a user writes can
become a directive or a command.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from dcslurm.core.errors import UserError
from dcslurm.core.plan import Plan
from dcslurm.core.plantypes import Resources, StepPlan
from dcslurm.core.shards import ChunkedIndexes, compress_indexes


@dataclass
class TaskLauncher:
    """How a task's command line is built on the compute node."""

    python: str
    prefix: list[str] = field(default_factory=list)  # e.g. apptainer exec ... (containers)
    env: dict[str, str] = field(default_factory=dict)  # exported before the command

    def command(self, plan: Plan, step: StepPlan, index_expr: str, log_expr: str) -> str:
        """The shell command running task `index_expr` (a shell expression) of `step`."""
        words = [*self.prefix, self.python, "-m", "dcslurm.core.runner", plan.run_url, step.name]
        return " ".join(shlex.quote(w) for w in words) + f" {index_expr} --log {log_expr}"


def _directive(option: str, value) -> str:
    text = str(value)
    if "\n" in text or "\r" in text or '"' in text:
        raise UserError(f"sbatch option --{option}: value {text!r} contains a newline or double quote, "
                        "which an #SBATCH line cannot hold")
    if any(c.isspace() for c in text) or any(c in text for c in "'$`\\;&|<>()#"):
        text = f'"{text}"'
    return f"#SBATCH --{option}={text}"


def _filename_pattern(path: str) -> str:
    """`path` inside an #SBATCH --output pattern, where SLURM expands `%A`, `%j`, ...:
    `%%` is a literal `%` (a run folder named `50%` must not become a job id)."""
    return path.replace("%", "%%")


def resource_directives(res: Resources, gpu: bool) -> list[str]:
    lines = [_directive("time", res.time), _directive("cpus-per-task", res.cpus_per_task)]
    for option, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos),
                          ("mem", res.mem), ("constraint", res.constraint), ("gres", res.gres)):
        if value:
            lines.append(_directive(option, value))
    if res.gpus_per_node and not res.gres:
        lines.append(_directive("gpus-per-node", res.gpus_per_node))
    if res.requeue:
        lines.append("#SBATCH --requeue")
    for extra in res.extra_sbatch:
        if "\n" in extra or "\r" in extra:
            raise UserError(f"[slurm] extra_sbatch: {extra!r} contains a newline")
        lines.append(f"#SBATCH {extra}")
    return lines


def render_step_script(plan: Plan, step: StepPlan, launcher: TaskLauncher, log_dir: str,
                       chunk: ChunkedIndexes | None = None) -> str:
    """The sbatch script for `step` (for arrays: one chunk of its pending tasks)."""
    res = step.resources
    step_logs = f"{log_dir.rstrip('/')}/{step.name}"
    lines = [
        "#!/bin/bash",
        f"# dcslurm run {plan.run_name!r}, step {step.name}: generated from the run's plan;",
        "# safe to read and to submit by hand with sbatch.",
        _directive("job-name", f"dcslurm.{plan.run_name}.{step.name}"),
    ]
    if step.layout == "array":
        if chunk is None:
            raise ValueError("array steps are rendered one chunk at a time")
        array = compress_indexes(chunk.array_ids)
        if res.array_throttle:
            array += f"%{res.array_throttle}"
        lines.append(_directive("array", array))
        lines.append(_directive("output", f"{_filename_pattern(step_logs)}/%A_%a.log"))
    else:
        lines.append(_directive("output", f"{_filename_pattern(step_logs)}/%j.log"))
    if step.layout == "distributed":
        lines += [_directive("nodes", res.nodes), _directive("ntasks-per-node", res.tasks_per_node)]
    else:
        lines += [_directive("nodes", 1), _directive("ntasks", 1)]
    if step.checkpointable:
        # The time-limit warning for a step that can checkpoint (dcslurm.core.task): its runner
        # stops the step, which saves, and requeues the job. srun's tasks get it without
        # `B:`; an array or single task is the batch shell itself (exec), so `B:`. USR2,
        # not USR1: NCCL may install its own USR1 handler (submitit warns of it).
        where = "" if step.layout == "distributed" else "B:"
        lines.append(_directive("signal", f"{where}USR2@{res.signal_seconds}"))
    lines.append("#SBATCH --kill-on-invalid-dep=yes")
    # A requeued job writes the same log file again: append, keeping the earlier attempts.
    lines.append("#SBATCH --open-mode=append")
    lines += resource_directives(res, step.gpu)
    lines += ["", "set -euo pipefail"]
    lines += list(res.setup)
    env = {"DCSLURM_STORAGE": json.dumps(plan.storage_options, sort_keys=True), **launcher.env}
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    quoted_logs = shlex.quote(step_logs)
    if step.layout == "array":
        lines.append(f"TASK_INDEX=$(( SLURM_ARRAY_TASK_ID + {chunk.offset} ))")
        log_expr = f'{quoted_logs}/"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}.log"'
        lines.append("exec " + launcher.command(plan, step, '"$TASK_INDEX"', log_expr))
    elif step.layout == "single":
        log_expr = f'{quoted_logs}/"${{SLURM_JOB_ID}}.log"'
        lines.append("exec " + launcher.command(plan, step, "0", log_expr))
    else:
        log_expr = f'{quoted_logs}/"${{SLURM_JOB_ID}}.log"'
        lines.append("exec srun --kill-on-bad-exit=1 " + launcher.command(plan, step, "0", log_expr))
    return "\n".join(lines) + "\n"


def render_submit_script(entries: list[tuple[str, str, list[int]]], log_dirs: list[str] = (),
                         after: list[str] = ()) -> str:
    """A bash script submitting rendered scripts in order with afterok dependencies.

    `entries` are (variable, script file name, indexes of earlier entries it waits for).
    `log_dirs`: the scripts' --output folders, made first (SLURM does not make them, and
    rendering makes nothing on the machine that renders). `after`: job ids of another run
    that the entries without earlier entries wait for.
    """
    lines = ["#!/bin/bash", "# Submit this run's scripts by hand, in order, with dependencies.",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    if log_dirs:
        lines.append("mkdir -p " + " ".join(shlex.quote(d) for d in log_dirs))
    for var, script, deps in entries:
        ids = ":".join(f"${{{entries[d][0]}}}" for d in deps) if deps else ":".join(after)
        dep = f'--dependency="afterok:{ids}" ' if ids else ""
        lines.append(f"{var}=$(sbatch --parsable {dep}{shlex.quote(script)} | cut -d';' -f1)")
        lines.append(f'echo "{script}: job ${{{var}}}"')
    return "\n".join(lines) + "\n"
