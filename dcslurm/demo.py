"""The end-to-end demo: the whole DataComp workflow on the offline demo pool.

`dcslurm demo --out DIR` runs, in order (each an ordinary run with its own run.toml
under DIR/configs/, so any step can be rerun by hand with `dcslurm submit -c`):

  1. DIR/pool                  the demo pool (`dcslurm pool demo`), skipped when complete;
  2. DIR/runs/nofilter         download -> filter "no_filter" -> reshard -> train -> eval;
  3. DIR/runs/clip30           embed nofilter's downloaded shards with the model nofilter
                               trained (no pretrained CLIP weights exist offline), filter
                               the top 30% by that score, reshard -> train -> eval;
  4. DIR/runs/<filter>-seedS   for S = 1..seeds-1: train + eval on that filter's reshard
                               folder with [run] seed = S;
  5. the results table (`dcslurm results DIR/runs`) and, per filter, the mean and
     spread of each demo task across seeds.

Every run skips its committed tasks, so rerunning the same command resumes.
Light at import (no torch): the CLI imports it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

from dcslurm.errors import UserError
from dcslurm.storage import DataFolder

# The demo pool's held-out sets (docs/DEMO_POOL.md), registered as extra eval tasks.
DEMO_TASKS = (
    {"key": "demo/shapes", "name": "Demo shapes", "evalset": "shapes", "num_classes": 6,
     "random_score": 1 / 6},
    {"key": "demo/colours", "name": "Demo colours", "evalset": "colours", "num_classes": 8,
     "random_score": 1 / 8},
    {"key": "demo/counts", "name": "Demo counts", "evalset": "counts", "num_classes": 4,
     "random_score": 1 / 4},
    {"key": "demo/retrieval", "name": "Demo retrieval", "evalset": "retrieval", "kind": "retrieval",
     "main_metric": "mean_recall@1"},
)

# The two filters compared. The scoring model's name ("tiny") names the embed
# outputs' score column, clip_tiny_similarity_score.
NOFILTER = "nofilter"
CLIP30 = "clip30"
FILTER_SPECS = {
    NOFILTER: "no_filter",
    CLIP30: "clip_score(score=clip_tiny_similarity_score, fraction=0.3)",
}

# Samples seen per training run. The tiny scale's own 40,960 (160 steps of 256)
# takes ~4 minutes per run on 2 idle cores; the demo trains 2 x seeds models, so it
# trains 10,240 samples (40 steps) each to stay near 20 minutes. 0 = the scale's.
DEFAULT_TRAIN_SAMPLES = 10_240


@dataclass
class DemoSettings:
    """What `dcslurm demo` was asked for."""

    out: str
    samples: int = 2000  # demo pool size
    seeds: int = 3
    executor: str = "local"  # local | slurm
    train_samples: int = DEFAULT_TRAIN_SAMPLES
    heldout: int = 300
    files: int = 4  # pool parquet files = download tasks

    def validate(self) -> None:
        if "://" in self.out:
            raise UserError(f"--out {self.out}: the demo writes to a local folder (its runs can use s3:// "
                            "when submitted by hand: see docs/DEMO.md)")
        if self.samples < 10:
            raise UserError(f"--samples {self.samples}: the demo needs at least 10 samples")
        if self.seeds < 1:
            raise UserError(f"--seeds {self.seeds}: must be >= 1")
        if self.executor not in ("local", "slurm"):
            raise UserError(f"--executor {self.executor!r}: expected local or slurm")
        if self.train_samples < 0:
            raise UserError(f"--train-samples {self.train_samples}: must be >= 0 (0 = the tiny scale's)")
        if self.heldout < 1:
            raise UserError(f"--heldout {self.heldout}: the demo's eval sets need at least 1 image")


@dataclass
class DemoRun:
    """One run of the demo: its name, filter, seed and run.toml text."""

    name: str
    filter: str  # NOFILTER or CLIP30
    seed: int
    toml: str
    config_path: str = ""


@dataclass
class DemoLayout:
    """Where the demo puts things under `out` (a local folder)."""

    out: str

    @property
    def pool(self) -> str:
        return os.path.join(self.out, "pool")

    @property
    def heldout(self) -> str:
        return os.path.join(self.pool, "heldout")

    @property
    def runs(self) -> str:
        return os.path.join(self.out, "runs")

    @property
    def configs(self) -> str:
        return os.path.join(self.out, "configs")

    def run(self, name: str) -> str:
        return os.path.join(self.runs, name)


def _q(s: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML)."""
    return json.dumps(s)


def _toml_inline(d: dict) -> str:
    parts = []
    for k, v in d.items():
        parts.append(f"{k} = {_q(v) if isinstance(v, str) else repr(v)}")
    return "{" + ", ".join(parts) + "}"


# The tiny model runs on CPUs: no GPU asked of SLURM, 2 cores a task, and the site's default
# memory (mem = "" drops the embed stage's 64G default: the demo's tasks need under 2 GB).
_CPU_RESOURCES = 'resources = {gpus_per_node = 0, cpus_per_task = 2, mem = ""}'


def _common(settings: DemoSettings, folder: str, seed: int, stages: list[str]) -> str:
    return (f"[run]\nfolder = {_q(folder)}\nscale = \"tiny\"\nseed = {seed}\n"
            f"stages = [{', '.join(_q(s) for s in stages)}]\n\n"
            f"[executor]\nkind = {_q(settings.executor)}\n"
            "max_parallel = 2  # local: two tasks at once (download, filter, reshard arrays) on 2 cores\n")


def _train_eval(settings: DemoSettings, layout: DemoLayout, data: str = "") -> str:
    train = ["[stages.train]"]
    if data:
        train.append(f"data = {_q(data)}")
    if settings.train_samples:
        train.append(f"samples = {settings.train_samples}")
    train.append("workers = 1  # data-loading processes: the demo targets 2 cores")
    train.append(_CPU_RESOURCES)
    tasks = ", ".join(_q(t["key"]) for t in DEMO_TASKS)
    extra = ",\n  ".join(_toml_inline(t) for t in DEMO_TASKS)
    return ("\n".join(train) + "\n\n"
            "[stages.eval]\n"
            f"tasks = [{tasks}]\n"
            f"evalsets = {_q(layout.heldout)}\n"
            "units_per_task = 4  # one process loads the model once for the four small sets\n"
            "num_workers = 1\n"
            f"{_CPU_RESOURCES}\n"
            f"extra_tasks = [\n  {extra},\n]\n")


def demo_runs(settings: DemoSettings) -> list[DemoRun]:
    """The demo's runs, in the order they must run, with their run.toml texts."""
    layout = DemoLayout(os.path.abspath(settings.out))
    runs = []
    nofilter_dir = layout.run(NOFILTER)
    runs.append(DemoRun(NOFILTER, NOFILTER, 0, (
        "# The unfiltered baseline: download the demo pool, keep every sample, train, evaluate.\n"
        + _common(settings, nofilter_dir, 0, ["download", "filter", "reshard", "train", "eval"])
        + f"\n[pool]\nmetadata = {_q(layout.pool)}\n\n"
        "[stages.download]\nprocesses = 1\nthreads = 16\n\n"
        f"[stages.filter]\nspec = {_q(FILTER_SPECS[NOFILTER])}\n\n"
        "[stages.reshard]\nsamples_per_shard = 1000\n\n"
        + _train_eval(settings, layout))))
    scorer = os.path.join(nofilter_dir, "train", "model.pt")
    runs.append(DemoRun(CLIP30, CLIP30, 0, (
        "# CLIP-score top 30%. No pretrained CLIP weights exist offline, so the scoring model\n"
        "# is the one the nofilter run trained on this same unfiltered pool.\n"
        + _common(settings, layout.run(CLIP30), 0, ["embed", "filter", "reshard", "train", "eval"])
        + f"\n[pool]\nshards = {_q(os.path.join(nofilter_dir, 'download'))}\n\n"
        "[stages.embed]\n"
        f"models = [{_toml_inline({'name': 'tiny', 'model': 'dcslurm-tiny-vit', 'pretrained': scorer})}]\n"
        "device = \"cpu\"\nworkers = 1\nunits_per_task = 64  # one task: the model loads once\n"
        f"{_CPU_RESOURCES}\n\n"
        f"[stages.filter]\nspec = {_q(FILTER_SPECS[CLIP30])}\n\n"
        "[stages.reshard]\nsamples_per_shard = 1000\n\n"
        + _train_eval(settings, layout))))
    for seed in range(1, settings.seeds):
        for name in (NOFILTER, CLIP30):
            run_name = f"{name}-seed{seed}"
            runs.append(DemoRun(run_name, name, seed, (
                f"# {name} with another seed: train + eval on the {name} run's resharded data.\n"
                + _common(settings, layout.run(run_name), seed, ["train", "eval"])
                # Not run here (not in stages): names the data's filter in `dcslurm results`.
                + f"\n[stages.filter]\nspec = {_q(FILTER_SPECS[name])}\n\n"
                + _train_eval(settings, layout, data=os.path.join(layout.run(name), "reshard")))))
    return runs


def write_configs(settings: DemoSettings) -> list[DemoRun]:
    """Write every run's run.toml under OUT/configs/ and return the runs."""
    layout = DemoLayout(os.path.abspath(settings.out))
    os.makedirs(layout.configs, exist_ok=True)
    runs = demo_runs(settings)
    for r in runs:
        r.config_path = os.path.join(layout.configs, f"{r.name}.toml")
        with open(r.config_path, "w") as f:
            f.write(r.toml)
    return runs


def pool_is_complete(settings: DemoSettings) -> bool:
    """The pool exists (serve.json is written last) and was made with these settings."""
    pool = DataFolder(DemoLayout(os.path.abspath(settings.out)).pool)
    if not (pool.exists("serve.json") and pool.exists("manifest.json")):
        return False
    m = pool.read_json("manifest.json")
    return (m.get("samples"), m.get("files"), m.get("heldout"), m.get("seed")) == \
        (settings.samples, settings.files, settings.heldout, 0)


def ensure_pool(settings: DemoSettings, log=print) -> None:
    """Generate the demo pool unless a complete one with the same settings is there."""
    from dcslurm.demo_pool import generate_demo_pool

    layout = DemoLayout(os.path.abspath(settings.out))
    if pool_is_complete(settings):
        log(f"demo pool: {layout.pool} is complete; reusing it")
        return
    if os.path.exists(os.path.join(layout.pool, "manifest.json")):
        raise UserError(f"{layout.pool}: a demo pool with other settings is there; use another --out")
    log(f"demo pool: writing {settings.samples:,} samples to {layout.pool}")
    generate_demo_pool(layout.pool, samples=settings.samples, seed=0, files=settings.files,
                       heldout=settings.heldout)


def run_one(run: DemoRun, log=print, poll_s: float = 10.0, timeout_s: float = 6 * 3600) -> float:
    """Submit one run and return when it is complete (the slurm executor is polled,
    since the next run reads this one's outputs). Returns the wall seconds."""
    from dcslurm.config import load_config
    from dcslurm.runs import run_status, submit_run

    started = time.time()
    cfg = load_config(run.config_path)
    step_started: dict[str, float] = {}

    def progress(step: str, done: int, total: int) -> None:
        step_started.setdefault(step, time.time())
        if done == total:
            log(f"  {run.name} {step}: {total} tasks done in {time.time() - step_started[step]:.0f} s")

    result = submit_run(cfg, progress=progress)
    if result.failed:
        where = ", ".join(f"{s} ({len(i)} tasks)" for s, i in result.failed.items())
        raise UserError(f"{cfg.run_url}: demo run {run.name} failed in {where}; see `dcslurm status {cfg.run_url}`")
    if cfg.executor.kind == "slurm":
        while True:
            _plan, steps = run_status(cfg.run_url, cfg.storage_options, cfg)
            failed = [s.name for s in steps if s.counts["failed"]]
            if failed:
                raise UserError(f"{cfg.run_url}: demo run {run.name} failed in {', '.join(failed)}; "
                                f"see `dcslurm status {cfg.run_url}`")
            if all(s.counts["done"] == s.n_tasks for s in steps):
                break
            if time.time() - started > timeout_s:
                raise UserError(f"{cfg.run_url}: demo run {run.name} not done after {timeout_s:.0f} s")
            time.sleep(poll_s)
    seconds = time.time() - started
    log(f"{run.name}: done in {seconds:.0f} s")
    return seconds


# -- the summary: mean and spread across seeds ---------------------------------

@dataclass
class FilterSummary:
    """One filter's results across seeds."""

    filter: str
    spec: str
    subset_size: int | None  # samples in the training shards
    seeds: list[int] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)  # task name -> one value per seed

    def mean(self, task: str) -> float:
        xs = self.scores[task]
        return math.fsum(xs) / len(xs)

    def std(self, task: str) -> float:
        """Sample standard deviation (n - 1); 0 for one seed."""
        xs = self.scores[task]
        if len(xs) < 2:
            return 0.0
        m = self.mean(task)
        return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(runs_dir: str, seeds: int) -> list[FilterSummary]:
    """Per filter: each demo task's main metric for seeds 0..seeds-1 (runs missing results are skipped)."""
    from dcslurm.results import read_run

    out = []
    for name in (NOFILTER, CLIP30):
        summary = FilterSummary(name, FILTER_SPECS[name], None)
        for seed in range(seeds):
            folder = DataFolder(os.path.join(runs_dir, name if seed == 0 else f"{name}-seed{seed}"))
            if not folder.exists("eval/results.jsonl"):
                continue
            r = read_run(folder)
            if seed == 0:
                summary.subset_size = trained_samples(folder.url)
            summary.seeds.append(seed)
            for t in DEMO_TASKS:
                value = r.aggregate.extras.get(t["name"])
                if value is not None:
                    summary.scores.setdefault(t["name"], []).append(value)
        out.append(summary)
    return out


def _short_names() -> list[str]:
    """Column names: "shapes", ..., "retrieval" (main metrics: accuracy, mean recall@1)."""
    return [t["name"].removeprefix("Demo ") for t in DEMO_TASKS]


def trained_samples(run_dir: str) -> int | None:
    """Samples in a run's training shards (reshard/sizes.json): the subset's samples
    that were downloaded (the nofilter subset also lists the pool's dead URLs)."""
    folder = DataFolder(run_dir)
    if not folder.exists("reshard/sizes.json"):
        return None
    return sum(folder.read_json("reshard/sizes.json").values())


def run_rows(runs_dir: str, seeds: int) -> tuple[list[str], list[list[str]]]:
    """(header, rows), one row per demo run with results: run, seed,
    samples trained on (the reshard size table), each demo task's main metric."""
    from dcslurm.results import read_run

    header = ["run", "seed", "samples", *_short_names()]
    rows = []
    for name in (NOFILTER, CLIP30):
        for seed in range(seeds):
            run_name = name if seed == 0 else f"{name}-seed{seed}"
            folder = DataFolder(os.path.join(runs_dir, run_name))
            if not folder.exists("eval/results.jsonl"):
                continue
            r = read_run(folder)
            size = trained_samples(os.path.join(runs_dir, name))
            rows.append([run_name, str(seed), "-" if size is None else f"{size:,}",
                         *(f"{r.aggregate.extras[t['name']]:.3f}" if t["name"] in r.aggregate.extras else "missing"
                           for t in DEMO_TASKS)])
    return header, rows


def summary_rows(summaries: list[FilterSummary]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): filter, samples trained on, then "mean±std" per demo task
    (a filter with fewer seeds than the others says how many)."""
    max_seeds = max((len(s.seeds) for s in summaries), default=0)
    tasks = [t["name"] for t in DEMO_TASKS]
    header = ["filter", "samples", *_short_names()]
    rows = []
    for s in summaries:
        cells = [s.filter if len(s.seeds) == max_seeds else f"{s.filter} ({len(s.seeds)} seeds)",
                 "-" if s.subset_size is None else f"{s.subset_size:,}"]
        for t in tasks:
            cells.append(f"{s.mean(t):.3f}±{s.std(t):.3f}" if s.scores.get(t) else "missing")
        rows.append(cells)
    return header, rows


def summary_markdown(summaries: list[FilterSummary]) -> str:
    header, rows = summary_rows(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# The pool's noise kinds (docs/DEMO_POOL.md) that can reach training (dead URLs cannot).
NOISE_COLUMNS = ("clean", "mismatched_caption", "boilerplate_caption", "non_english_caption", "tiny_image",
                 "extreme_aspect")


def noise_composition(out: str) -> dict[str, dict[str, int]]:
    """Per filter: how many of the samples it trained on are of each of the pool's
    noise kinds (the pool's `demo_kind` ground truth, which no filter reads).
    Trained samples = the filter's subset.npy uids that the nofilter run downloaded."""
    import glob

    import numpy as np
    import pyarrow.parquet as pq

    layout = DemoLayout(os.path.abspath(out))
    kind_of: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(layout.pool, "*.parquet"))):
        t = pq.read_table(path, columns=["uid", "demo_kind"])
        kind_of.update(zip(t.column("uid").to_pylist(), t.column("demo_kind").to_pylist()))
    downloaded: set[str] = set()
    for path in sorted(glob.glob(os.path.join(layout.run(NOFILTER), "download", "*.parquet"))):
        t = pq.read_table(path, columns=["uid", "status"])
        downloaded.update(u for u, st in zip(t.column("uid").to_pylist(), t.column("status").to_pylist())
                          if st == "success")
    out_counts = {}
    for name in (NOFILTER, CLIP30):
        path = os.path.join(layout.run(name), "filter", "subset.npy")
        if not os.path.exists(path):
            continue
        counts = {k: 0 for k in NOISE_COLUMNS}
        for hi, lo in np.load(path).tolist():
            uid = f"{int(hi):016x}{int(lo):016x}"
            if uid in downloaded:
                kind = kind_of.get(uid, "?")
                counts[kind] = counts.get(kind, 0) + 1
        out_counts[name] = counts
    return out_counts


def noise_rows(composition: dict[str, dict[str, int]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): filter, samples, then the percentage of each noise kind."""
    short = {"clean": "clean", "mismatched_caption": "mismatch", "boilerplate_caption": "boilerpl.",
             "non_english_caption": "non-EN", "tiny_image": "tiny", "extreme_aspect": "aspect"}
    header = ["filter", "samples", *(short[k] for k in NOISE_COLUMNS)]
    rows = []
    for name, counts in composition.items():
        total = sum(counts.values())
        rows.append([name, f"{total:,}", *(f"{100 * counts.get(k, 0) / max(total, 1):.1f}%" for k in NOISE_COLUMNS)])
    return header, rows


def chance_row(heldout: int) -> dict[str, float | None]:
    """Each demo task's chance score; retrieval's mean recall@1 is 1 / images either way
    (text -> image: 1 of N images; image -> text: 3 of its 3N captions)."""
    return {t["name"]: t.get("random_score", 1 / heldout) for t in DEMO_TASKS}
