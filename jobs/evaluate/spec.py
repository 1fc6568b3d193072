"""Evaluation stage: DataComp's 38-task suite on a trained checkpoint.

eval.run    : array over the selected tasks (a task per array element by
              default); each writes RUN/eval/tasks/<key>.json atomically.
eval.gather : one task; writes RUN/eval/results.jsonl in DataComp's format,
              one `{"key", "dataset", "metrics": {..., "main_metric"}}` line
              per task.

Eval sets are clip_benchmark-layout webdatasets under `evalsets` (a local
folder or s3:// prefix; `dcslurm evalsets prepare` mirrors the published ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcslurm.core.errors import UserError
from dcslurm.core.plantypes import Estimate
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec


@dataclass
class EvalParams:
    tasks: list[str] | str = "scored"  # "scored" (38), "all" (40), "extra", or task keys / names
    evalsets: str = ""  # root URL holding wds_<task>_test folders
    batch_size: int = 64
    checkpoint: str = ""  # default: RUN/train/model.pt
    model: str | None = None  # open_clip model name; None = the scale's model
    num_workers: int = 2  # image decoding threads
    device: str = ""  # default: cuda if available, else cpu
    extra_tasks: list[dict] = field(default_factory=list)  # tasks beyond DataComp's (e.g. the demo's)

    def validate(self) -> None:
        from dcslurm.datacomp.tasks import register_task, select_tasks, task_from_dict

        if not self.evalsets:
            raise ValueError("evalsets: set the folder or s3:// prefix holding the eval sets "
                             "(dcslurm evalsets prepare --out URL makes one)")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        from jobs.evaluate.metrics import METRICS_BY_KIND

        try:
            for d in self.extra_tasks:
                task = register_task(task_from_dict(d))
                names = METRICS_BY_KIND.get(task.kind)
                if names is not None and task.main_metric not in names:
                    raise UserError(f"extra task {task.key!r}: main_metric {task.main_metric!r} is not a "
                                    f"metric of a {task.kind} task (one of {', '.join(names)})")
            select_tasks(self.tasks)
        except UserError as exc:
            raise ValueError(f"tasks: {exc}") from None


def selected_tasks(params: EvalParams) -> list:
    """The tasks the params select, their extra tasks registered first."""
    from dcslurm.datacomp.tasks import register_task, select_tasks, task_from_dict

    for d in params.extra_tasks:
        register_task(task_from_dict(d))
    return select_tasks(params.tasks)


def _task_units(ctx: PlanContext) -> UnitSet:
    keys = tuple(t.key for t in selected_tasks(ctx.params))
    return UnitSet(count=len(keys), names=keys, label="eval tasks")


def _single(ctx: PlanContext) -> UnitSet:
    return UnitSet(count=1, label="task")


def _estimate(ctx: PlanContext, units: dict) -> Estimate:
    # DataComp's tasklist.yml gives each task a `time` in seconds on its reference GPU.
    tasks = selected_tasks(ctx.params)
    seconds = sum(_task_seconds(t.key) for t in tasks)
    return Estimate(gpu_hours=seconds / 3600, bytes_written=2_000 * len(tasks),
                    basis="sum of DataComp tasklist.yml per-task `time` (seconds, one GPU)")


def _task_seconds(key: str) -> float:
    import yaml

    from dcslurm.datacomp.tasks import TASKLIST_FILE

    global _TIMES
    if _TIMES is None:
        with open(TASKLIST_FILE) as f:
            _TIMES = {k: float((v or {}).get("time", 0)) for k, v in yaml.safe_load(f).items()}
    return _TIMES.get(key, 0.0)


_TIMES: dict[str, float] | None = None


def _preflight(config) -> None:
    """At plan and submit: the model checkpoint (unless this run's train stage writes it),
    the model name, and every selected task's eval set: its folder, metadata files and
    the shards nshards.txt promises (one listing per set; no shard is read)."""
    from concurrent.futures import ThreadPoolExecutor

    from dcslurm.core.stages import in_run, require_file
    from jobs.models import check_weights

    params = config.stages["eval"].params or EvalParams()
    model = params.model or config.scale.model
    checkpoint = params.checkpoint
    if not checkpoint and not in_run(config, "train"):
        checkpoint = config.folder().url_of("train/model.pt")  # a train run of this folder wrote it before
    if checkpoint:
        require_file(checkpoint, config.storage_options, "eval checkpoint")
    check_weights(model, "", config.storage_options, where="[stages.eval] model: ")
    root = config.folder(params.evalsets)
    if not root.exists():
        raise UserError(f"{root.url}: eval sets folder does not exist "
                        "(dcslurm evalsets prepare --out URL mirrors the published sets)")
    tasks = [t for t in selected_tasks(params) if t.kind != "multilabel_faces"]  # those read no eval set
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(lambda t: check_evalset(root, t), tasks):
            pass


def check_evalset(root, task) -> None:
    """One-line UserError unless `task`'s eval set under `root` holds what evalset.py reads."""
    from jobs.evaluate.evalset import EvalSet
    from jobs.evaluate.stage import evalset_folder

    evalset = EvalSet.open(evalset_folder(root, task), need_classes=task.kind not in ("retrieval", "winogavil"))
    have = set(evalset.folder.list(evalset.split))
    for rel in evalset.shard_names():
        if rel.rsplit("/", 1)[1] not in have:
            raise UserError(f"{evalset.folder.url_of(rel)}: missing shard (nshards.txt says {evalset.nshards})")

STAGES = [
    StageSpec(
        name="eval", description="zero-shot evaluation on DataComp's 38 tasks; results.jsonl", order=60,
        params=EvalParams, gpu=True, estimate=_estimate, preflight=_preflight,
        default_resources={"gpus_per_node": 1, "cpus_per_task": 4, "time": "04:00:00"},
        steps=(
            StepSpec("run", "jobs.evaluate.stage:evaluate_tasks", _task_units, default_units_per_task=1),
            StepSpec("gather", "jobs.evaluate.stage:gather", _single, layout="single"),
        ),
    ),
]
