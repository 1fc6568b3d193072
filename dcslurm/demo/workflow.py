"""The end-to-end demo: the whole DataComp workflow on the offline demo pool.

`dcslurm demo --out DIR` is two sweeps (dcslurm/core/sweep.py) over the demo pool:

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

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from dcslurm.demo.pool import DEFAULT_SERVE_PORT, DemoPoolServer, generate_demo_pool

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
        from dcslurm.core.sweep import UPSTREAM

        return os.path.join(self.sweep(name), UPSTREAM)

    def run(self, name: str, seed: int = 0) -> str:
        """A filter's run folder for one seed (the sweep's SWEEP/runs/<branch>-seed<S>)."""
        return os.path.join(self.sweep(name), "runs", f"{name}-seed{seed}")


# The tiny model runs on CPUs: no GPU asked of SLURM, 2 cores a task, and the site's default
# memory (mem = "" drops the embed stage's 64G default: the demo's tasks need under 2 GB).
_CPU_RESOURCES = {"gpus_per_node": 0, "cpus_per_task": 2, "mem": ""}

# What `dcslurm demo --config-only` writes as the download's http_proxy: `dcslurm pool serve`'s
# default address. `dcslurm demo` itself writes the address of the server it runs.
CONFIG_ONLY_PROXY = f"http://127.0.0.1:{DEFAULT_SERVE_PORT}"

_HEADS = {
    NOFILTER: "The unfiltered baseline: download the demo pool (the upstream), keep every sample,\n"
              "reshard, train and evaluate with each seed. Written by `dcslurm demo`.\n"
              "The download fetches the pool's URLs through http_proxy: the pool's server, which\n"
              "`dcslurm demo` runs while its sweeps run (by hand: `dcslurm pool serve`).",
    CLIP30: "CLIP-score top 30%. No pretrained CLIP weights exist offline, so the upstream embeds\n"
            "the nofilter sweep's downloaded shards with the model its first seed trained on this\n"
            "same unfiltered pool. Runs after the nofilter sweep. Written by `dcslurm demo`.",
}


def _eval_tasks(settings: DemoSettings) -> list[dict]:
    """DEMO_TASKS, retrieval with its chance: mean recall@1 is 1 / images either way
    (text -> image: 1 of N images; image -> text: 3 of its 3N captions)."""
    return [t if "random_score" in t else {**t, "random_score": 1 / settings.heldout} for t in DEMO_TASKS]


def _sweep_doc(settings: DemoSettings, layout: DemoLayout, name: str, pool: dict, stages: dict) -> dict:
    """A sweep file: run, seeds, executor, `pool`, then `stages` and the branch's reshard, train
    (the filter spec is the branch's) and eval."""
    train = {"samples": settings.train_samples} if settings.train_samples else {}
    return {
        "run": {"folder": layout.sweep(name), "name": "demo", "scale": "tiny"},
        "sweep": {"seeds": list(range(settings.seeds))},
        # local: two tasks at once (download, filter, reshard arrays) on 2 cores
        "executor": {"kind": settings.executor, "max_parallel": 2},
        "pool": pool,
        "stages": {
            **stages,
            "reshard": {"samples_per_shard": 1000},
            # workers: data-loading processes; the demo targets 2 cores
            "train": {**train, "workers": 1, "resources": _CPU_RESOURCES},
            "eval": {
                "tasks": [t["key"] for t in DEMO_TASKS],
                "evalsets": layout.heldout,
                "units_per_task": 4,  # one process loads the model once for the four small sets
                "num_workers": 1,
                "resources": _CPU_RESOURCES,
                "extra_tasks": _eval_tasks(settings),
            },
        },
        "branches": [{"name": name, "filter": FILTER_SPECS[name]}],
    }


def sweep_docs(settings: DemoSettings, http_proxy: str = CONFIG_ONLY_PROXY) -> dict[str, dict]:
    """The demo's sweep files, in the order they must run: name -> the file's tables.
    `http_proxy`: where the download reaches the demo pool's server."""
    layout = DemoLayout(os.path.abspath(settings.out))
    first = 0  # the first seed's run filters, reshards, and (nofilter's) trains the scorer
    scorer = os.path.join(layout.run(NOFILTER, first), "train", "model.pt")
    download = {"processes": 1, "threads": 16, "http_proxy": http_proxy}
    embed = {
        "models": [{"name": "tiny", "model": "dcslurm-tiny-vit", "pretrained": scorer}],
        "device": "cpu", "workers": 1,
        "units_per_task": 64,  # one task: the model loads once
        "resources": _CPU_RESOURCES,
    }
    return {
        NOFILTER: _sweep_doc(settings, layout, NOFILTER, {"metadata": layout.pool}, {"download": download}),
        CLIP30: _sweep_doc(settings, layout, CLIP30,
                           {"shards": os.path.join(layout.upstream(NOFILTER), "download")}, {"embed": embed}),
    }


def write_sweep_files(settings: DemoSettings, http_proxy: str = CONFIG_ONLY_PROXY) -> list[str]:
    """Write DIR/configs/<name>.toml for each sweep, checked as sweep files (no I/O
    beyond the write: the pool and the scorer need not exist yet); their paths in order."""
    from dcslurm.core.sweep import load_sweep

    layout = DemoLayout(os.path.abspath(settings.out))
    os.makedirs(layout.configs, exist_ok=True)
    paths = []
    for name, doc in sweep_docs(settings, http_proxy).items():
        path = write_toml(layout.sweep_file(name), doc, _HEADS[name])
        load_sweep(path)
        paths.append(path)
    return paths


def serve_pool(settings: DemoSettings) -> DemoPoolServer:
    """The demo pool's server for the demo's runs (not started): on 127.0.0.1 for the local
    executor; on every address for SLURM, whose tasks reach it by this host's name."""
    pool = DataFolder(DemoLayout(os.path.abspath(settings.out)).pool)
    return DemoPoolServer.for_pool(pool, bind="127.0.0.1" if settings.executor == "local" else "0.0.0.0")


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
    """Run one sweep file (dcslurm.core.sweep.submit_sweep) and return when every piece is
    complete: the local executor runs them in turn; on SLURM they are queued at once and
    polled, since the demo's next sweep reads this one's outputs. Returns what failed,
    one line a piece ([] = all done)."""
    from dcslurm.core.sweep import load_sweep, submit_sweep, sweep_status

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
    """The leaderboard (dcslurm.datacomp.results) of every demo run under OUT/sweeps."""
    from dcslurm.datacomp.results import leaderboard

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
