"""The evaluation tasks: DataComp's 38 scored tasks, 2 unscored fairness tasks,
and any extra tasks a user (or the end-to-end demo) registers.

The table comes from a copy of DataComp's published `tasklist.yml`
(`dcslurm/datacomp/data/tasklist.yml`): names, sizes, main metrics, random scores.
Light module (no torch): the results command and the planner read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dcslurm.core.errors import UserError

TASKLIST_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tasklist.yml")

# DataComp's aggregate groups, by dataset name (aggregate_scores.py); "Average"
# is the mean over all 38 scored tasks.
AGGREGATE_GROUPS: dict[str, frozenset[str]] = {
    "ImageNet": frozenset({"ImageNet 1k"}),
    "ImageNet dist. shifts": frozenset({
        "ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"}),
    "VTAB": frozenset({
        "Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
        "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45",
        "SVHN", "SUN397"}),
    "Retrieval": frozenset({"Flickr", "MSCOCO", "WinoGAViL"}),
}

# How a task is evaluated (which code path in jobs/evaluate), by key.
KINDS = ("classification", "retrieval", "winogavil", "wilds", "dollar_street", "geode", "multilabel_faces")


@dataclass(frozen=True)
class Task:
    """One evaluation task, as in DataComp's tasklist.yml."""

    key: str  # e.g. "vtab/cifar100"; also the results' "key"
    name: str  # e.g. "CIFAR-100"; the results' "dataset"
    main_metric: str = "acc1"
    size: int | None = None
    num_classes: int | None = None
    random_score: float | None = None
    tags: tuple[str, ...] = ()
    scored: bool = True  # counts in DataComp's 38-task average
    kind: str = "classification"
    evalset: str = ""  # folder name under the eval sets root; default from the key
    extra: bool = False  # registered by a user, not one of DataComp's 40

    @property
    def group(self) -> str:
        """The display group: an aggregate group, or the task's family."""
        for group, names in AGGREGATE_GROUPS.items():
            if self.name in names:
                return group
        if self.extra:
            return "extra"
        if self.kind in ("dollar_street", "geode", "multilabel_faces"):
            return "fairness"
        if self.kind == "wilds":
            return "WILDS"
        return "other classification"

    @property
    def evalset_dir(self) -> str:
        """Folder of this task's eval set under the eval sets root (DataComp's naming)."""
        if self.evalset:
            return self.evalset
        key = self.key.split("/", 1)[1] if self.key.startswith("fairness/") else self.key
        return f"wds_{key.replace('/', '-')}_test"


def _kind_of(key: str) -> str:
    if key.startswith("retrieval/"):
        return "retrieval"
    if key == "misc/winogavil":
        return "winogavil"
    if key.startswith("wilds/"):
        return "wilds"
    if key == "fairness/dollar_street":
        return "dollar_street"
    if key == "fairness/geode":
        return "geode"
    if key in ("fairness/fairface", "fairness/utkface"):
        return "multilabel_faces"
    return "classification"


def load_tasklist(path: str = TASKLIST_FILE) -> dict[str, Task]:
    """Tasks from a DataComp-format tasklist.yml, by key, in file order."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the task list ({exc})") from None
    tasks: dict[str, Task] = {}
    for key, info in (raw or {}).items():
        info = info or {}
        # fairface/utkface have no main metric: DataComp drops them from the average.
        scored = "main_metric" in info or "fairness" not in (info.get("tags") or [])
        tasks[key] = Task(
            key=key, name=info.get("name", key), main_metric=info.get("main_metric", "acc1"),
            size=info.get("size"), num_classes=info.get("num_classes"), random_score=info.get("random_score"),
            tags=tuple(info.get("tags") or ()), scored=scored, kind=_kind_of(key),
        )
    return tasks


_DATACOMP: dict[str, Task] | None = None
_EXTRA: dict[str, Task] = {}


def datacomp_tasks() -> dict[str, Task]:
    """DataComp's 40 tasks (38 scored + FairFace, UTKFace), by key."""
    global _DATACOMP
    if _DATACOMP is None:
        _DATACOMP = load_tasklist()
    return _DATACOMP


def scored_tasks() -> list[Task]:
    """The 38 tasks of DataComp's average, in tasklist order."""
    return [t for t in datacomp_tasks().values() if t.scored]


def register_task(task: Task) -> Task:
    """Add an extra task (e.g. the end-to-end demo's tiny sets); it is reported
    in the same tables but never enters DataComp's aggregates."""
    if task.key in datacomp_tasks():
        raise UserError(f"task {task.key!r}: already one of DataComp's tasks")
    if task.kind not in KINDS:
        raise UserError(f"task {task.key!r}: unknown kind {task.kind!r} (one of {', '.join(KINDS)})")
    registered = Task(**{**task.__dict__, "extra": True, "scored": False})
    _EXTRA[task.key] = registered
    return registered


def unregister_task(key: str) -> None:
    _EXTRA.pop(key, None)


def all_tasks() -> dict[str, Task]:
    """DataComp's tasks then the registered extras, by key."""
    return {**datacomp_tasks(), **_EXTRA}


def get_task(key_or_name: str) -> Task:
    """A task by key ("vtab/cifar100") or name ("CIFAR-100"); one-line error if unknown."""
    tasks = all_tasks()
    if key_or_name in tasks:
        return tasks[key_or_name]
    for task in tasks.values():
        if task.name == key_or_name:
            return task
    raise UserError(f"unknown eval task {key_or_name!r}: use a key of dcslurm/datacomp/data/tasklist.yml "
                    f"(e.g. imagenet1k, vtab/cifar100, retrieval/mscoco_2014_5k_test_image_text_retrieval) "
                    f"or a registered extra task")


def select_tasks(selection: str | list[str]) -> list[Task]:
    """Tasks from a selection: "scored" (the 38), "all" (the 40), "extra"
    (registered extras), or a list / comma-separated string of keys or names."""
    if isinstance(selection, str):
        if selection == "scored":
            return scored_tasks()
        if selection == "all":
            return list(datacomp_tasks().values())
        if selection == "extra":
            return list(_EXTRA.values())
        selection = [s.strip() for s in selection.split(",") if s.strip()]
    out: list[Task] = []
    for item in selection:
        task = get_task(item)
        if task not in out:
            out.append(task)
    if not out:
        raise UserError("eval tasks: the selection is empty")
    return out


def task_from_dict(d: dict) -> Task:
    """A Task from a plain dict (e.g. a stage param describing an extra task)."""
    known = {f for f in Task.__dataclass_fields__}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"extra task {d.get('key', '?')!r}: unknown fields {', '.join(sorted(unknown))}")
    if "key" not in d or "name" not in d:
        raise UserError("extra task: needs at least 'key' and 'name'")
    return Task(**{**d, "tags": tuple(d.get("tags", ()))})


__all__ = ["AGGREGATE_GROUPS", "Task", "all_tasks", "datacomp_tasks", "get_task", "load_tasklist",
           "register_task", "scored_tasks", "select_tasks", "task_from_dict", "unregister_task"]
