"""The end-to-end demo: the whole DataComp workflow on the offline demo pool.

`dcslurm demo --out DIR` is two sweeps (dcslurm/sweep.py) over the demo pool:

  DIR/pool                        the demo pool (`dcslurm pool demo`), skipped when complete;
  DIR/configs/nofilter.toml  ->   DIR/sweeps/nofilter: upstream = download; branch
                                  nofilter (filter "no_filter") x seeds 0..seeds-1;
  DIR/configs/clip30.toml    ->   DIR/sweeps/clip30: upstream = embed nofilter's downloaded
                                  shards with the model nofilter-seed0 trained (no pretrained
                                  CLIP weights exist offline), branch clip30 (top 30% by that
                                  score) x the same seeds;

then the leaderboard of DIR/sweeps (results.leaderboard: per filter, mean ± std over the
seeds of each demo task, chance beside it) and what each filter trained on by the
pool's noise kind. Two sweeps, because the second one's upstream reads a model a branch
of the first trains. Each is an ordinary sweep file (`dcslurm sweep -c` reruns one) and
every piece skips its committed tasks, so rerunning the same command resumes.
Light at import (no torch): the CLI imports it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dcslurm.errors import UserError
from dcslurm.storage import DataFolder
from dcslurm.sweep import toml_value

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
    def configs(self) -> str:
        return os.path.join(self.out, "configs")

    @property
    def sweeps(self) -> str:
        return os.path.join(self.out, "sweeps")

    def sweep_file(self, name: str) -> str:
        return os.path.join(self.configs, f"{name}.toml")

    def sweep(self, name: str) -> str:
        return os.path.join(self.sweeps, name)

    def upstream(self, name: str) -> str:
        from dcslurm.sweep import UPSTREAM

        return os.path.join(self.sweep(name), UPSTREAM)

    def run(self, name: str, seed: int = 0) -> str:
        """A filter's run folder for one seed (the sweep's SWEEP/runs/<branch>-seed<S>)."""
        return os.path.join(self.sweep(name), "runs", f"{name}-seed{seed}")


# The tiny model runs on CPUs: no GPU asked of SLURM, 2 cores a task, and the site's default
# memory (mem = "" drops the embed stage's 64G default: the demo's tasks need under 2 GB).
_CPU_RESOURCES = 'resources = {gpus_per_node = 0, cpus_per_task = 2, mem = ""}'


def _eval_tasks(settings: DemoSettings) -> list[dict]:
    """DEMO_TASKS, retrieval with its chance: mean recall@1 is 1 / images either way
    (text -> image: 1 of N images; image -> text: 3 of its 3N captions)."""
    return [t if "random_score" in t else {**t, "random_score": 1 / settings.heldout} for t in DEMO_TASKS]


def _sweep_head(settings: DemoSettings, layout: DemoLayout, name: str) -> str:
    seeds = ", ".join(str(s) for s in range(settings.seeds))
    return (f"[run]\nfolder = {toml_value(layout.sweep(name))}\nname = \"demo\"\nscale = \"tiny\"\n\n"
            f"[sweep]\nseeds = [{seeds}]\n\n"
            f"[executor]\nkind = {toml_value(settings.executor)}\n"
            "max_parallel = 2  # local: two tasks at once (download, filter, reshard arrays) on 2 cores\n")


def _branch_stages(settings: DemoSettings, layout: DemoLayout, name: str) -> str:
    """reshard, train, eval (the filter spec is the branch's) and the branch itself."""
    train = ["[stages.train]"]
    if settings.train_samples:
        train.append(f"samples = {settings.train_samples}")
    train.append("workers = 1  # data-loading processes: the demo targets 2 cores")
    train.append(_CPU_RESOURCES)
    tasks = _eval_tasks(settings)
    keys = ", ".join(toml_value(t["key"]) for t in tasks)
    extra = ",\n  ".join(toml_value(t) for t in tasks)
    return ("[stages.reshard]\nsamples_per_shard = 1000\n\n"
            + "\n".join(train) + "\n\n"
            "[stages.eval]\n"
            f"tasks = [{keys}]\n"
            f"evalsets = {toml_value(layout.heldout)}\n"
            "units_per_task = 4  # one process loads the model once for the four small sets\n"
            "num_workers = 1\n"
            f"{_CPU_RESOURCES}\n"
            f"extra_tasks = [\n  {extra},\n]\n\n"
            f"[[branches]]\nname = {toml_value(name)}\nfilter = {toml_value(FILTER_SPECS[name])}\n")


def sweep_texts(settings: DemoSettings) -> dict[str, str]:
    """The demo's sweep files, in the order they must run: name -> TOML text."""
    layout = DemoLayout(os.path.abspath(settings.out))
    first = 0  # the first seed's run filters, reshards, and (nofilter's) trains the scorer
    scorer = os.path.join(layout.run(NOFILTER, first), "train", "model.pt")
    return {
        NOFILTER: (
            "# The unfiltered baseline: download the demo pool (the upstream), keep every sample,\n"
            "# reshard, train and evaluate with each seed. Written by `dcslurm demo`.\n"
            + _sweep_head(settings, layout, NOFILTER)
            + f"\n[pool]\nmetadata = {toml_value(layout.pool)}\n\n"
            "[stages.download]\nprocesses = 1\nthreads = 16\n\n"
            + _branch_stages(settings, layout, NOFILTER)),
        CLIP30: (
            "# CLIP-score top 30%. No pretrained CLIP weights exist offline, so the upstream embeds\n"
            "# the nofilter sweep's downloaded shards with the model its first seed trained on this\n"
            "# same unfiltered pool. Runs after the nofilter sweep. Written by `dcslurm demo`.\n"
            + _sweep_head(settings, layout, CLIP30)
            + f"\n[pool]\nshards = {toml_value(os.path.join(layout.upstream(NOFILTER), 'download'))}\n\n"
            "[stages.embed]\n"
            f"models = [{toml_value({'name': 'tiny', 'model': 'dcslurm-tiny-vit', 'pretrained': scorer})}]\n"
            "device = \"cpu\"\nworkers = 1\nunits_per_task = 64  # one task: the model loads once\n"
            f"{_CPU_RESOURCES}\n\n"
            + _branch_stages(settings, layout, CLIP30)),
    }


def write_sweep_files(settings: DemoSettings) -> list[str]:
    """Write DIR/configs/<name>.toml for each sweep, checked as sweep files (no I/O
    beyond the write: the pool and the scorer need not exist yet); their paths in order."""
    from dcslurm.sweep import load_sweep

    layout = DemoLayout(os.path.abspath(settings.out))
    os.makedirs(layout.configs, exist_ok=True)
    paths = []
    for name, text in sweep_texts(settings).items():
        path = layout.sweep_file(name)
        with open(path, "w") as f:
            f.write(text)
        load_sweep(path)
        paths.append(path)
    return paths


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


def run_sweep(path: str, log=print, poll_s: float = 10.0, timeout_s: float = 6 * 3600) -> list[str]:
    """Run one sweep file (dcslurm.sweep.submit_sweep) and return when every piece is
    complete: the local executor runs them in turn; on SLURM they are queued at once and
    polled, since the demo's next sweep reads this one's outputs. Returns what failed,
    one line a piece ([] = all done)."""
    from dcslurm.sweep import load_sweep, submit_sweep, sweep_status

    started = time.time()
    sweep = load_sweep(path)
    step_started: dict[str, float] = {}

    def progress(step: str, done: int, total: int) -> None:
        step_started.setdefault(step, time.time())
        if done == total:
            log(f"  {step}: {total} tasks done in {time.time() - step_started.pop(step):.0f} s")

    results = submit_sweep(sweep, progress=progress, log=log)
    failed = [f"{r.piece}: {', '.join(f'{k} ({len(v)} tasks)' for k, v in r.failed.items())} failed" for r in results
              if r.failed] + [f"{r.piece}: not run: {r.skipped}" for r in results if r.skipped]
    if not failed and sweep.pieces[0].config.executor.kind == "slurm":
        while True:
            states = sweep_status(sweep.folder, sweep.storage_options)
            failed = [f"{p.piece}: {', '.join(p.failed_steps)} failed" for p in states if p.state == "failed"]
            if failed or all(p.state == "done" for p in states):
                break
            if time.time() - started > timeout_s:
                raise UserError(f"{sweep.folder}: demo sweep not done after {timeout_s:.0f} s; "
                                f"see `dcslurm sweep status {sweep.folder}`")
            time.sleep(poll_s)
    log(f"{sweep.folder}: {'failed' if failed else 'done'} in {time.time() - started:.0f} s")
    return failed


def demo_leaderboard(out: str):
    """The leaderboard (dcslurm.results) of every demo run under OUT/sweeps."""
    from dcslurm.results import leaderboard

    return leaderboard(DemoLayout(os.path.abspath(out)).sweeps)


# The pool's noise kinds (docs/DEMO_POOL.md) that can reach training (dead URLs cannot).
NOISE_COLUMNS = ("clean", "mismatched_caption", "boilerplate_caption", "non_english_caption", "tiny_image",
                 "extreme_aspect")


def noise_composition(out: str) -> dict[str, dict[str, int]]:
    """Per filter: how many of the samples it trained on are of each of the pool's
    noise kinds (the pool's `demo_kind` ground truth, which no filter reads).
    Trained samples = the filter's subset.npy uids that the nofilter sweep's upstream downloaded."""
    import glob

    import numpy as np
    import pyarrow.parquet as pq

    layout = DemoLayout(os.path.abspath(out))
    kind_of: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(layout.pool, "*.parquet"))):
        t = pq.read_table(path, columns=["uid", "demo_kind"])
        kind_of.update(zip(t.column("uid").to_pylist(), t.column("demo_kind").to_pylist()))
    downloaded: set[str] = set()
    for path in sorted(glob.glob(os.path.join(layout.upstream(NOFILTER), "download", "*.parquet"))):
        t = pq.read_table(path, columns=["uid", "status"])
        downloaded.update(u for u, st in zip(t.column("uid").to_pylist(), t.column("status").to_pylist())
                          if st == "success")
    out_counts = {}
    for name in (NOFILTER, CLIP30):
        path = os.path.join(layout.run(name), "filter", "subset.npy")  # the first seed filters
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
