"""Dataset-bias probe ("Understanding Bias in Large-Scale Visual Datasets", SPEC section 4).

Can a linear classifier tell which source an item comes from? Three steps:

sample (array) per metadata file of every source: the rows the source's subset
       keeps (all rows without one), each with a priority = a hash of (uid, seed,
       source); the `samples` lowest-priority rows and their embeddings
       -> _bias/candidates/SRC-PID.npz. The global choice (lowest priorities of the
       whole source) is a subset of the union, so it does not depend on the split.
images (array) per image tar of every source: for the chosen uids, the image
       transformations -> _bias/images/SRC-PID.npz
probe  (one task): the same `samples` rows per source (balanced classes), a
       seeded stratified train/test split, one logistic regression per feature
       set; held-out accuracy with a 95% Wilson interval, an exact one-sided
       binomial test against chance, and the confusion matrix -> report.

Features: `img`/`txt` = the CLIP embeddings in the npz (<model>_img, <model>_txt).
The paper re-embeds transformed images with a trained model; no pretrained
model exists offline, so each transformation here is followed by a fixed
feature: the transformed image at 16x16 pixels (the transform runs at 64x64),
and `mean_colour` is just the 3 mean RGB values. A report says so.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.shards import split_evenly
from dcslurm.core.storage import DataFolder
from jobs.audit.charts import png_bytes, pyplot
from jobs.audit.spec import EMBEDDING_FEATURES, TRANSFORMS, validate_sources
from jobs.filter.engine import InputFile, Reader

CANDIDATES = "_bias/candidates"
IMAGES = "_bias/images"
WORK_SIDE = 64  # transformations run on the image squashed to 64x64
FEATURE_SIDE = 16  # ... and are read as a 16x16 image
PATCH_GRID = 4  # patch shuffle: a 4x4 grid of patches
FEATURE_NOTE = ("Image transformations: computed from the shards on the image squashed to 64x64; with no "
                "pretrained model offline, the classifier sees the transformed image downsampled to 16x16 pixels "
                "(mean_colour: the 3 mean RGB values), not a re-embedding of it as in the paper.")


@dataclass(frozen=True)
class Source:
    name: str
    metadata: str  # folder of parquet (+ npz beside)
    subset: str = ""  # subset .npy restricting it
    shards: str = ""  # folder of webdataset tars (for image transformations)


def sources_from(params_sources: list[dict]) -> list[Source]:
    try:
        validate_sources(params_sources)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return [Source(s["name"], s["metadata"], s.get("subset", ""), s.get("shards", "")) for s in params_sources]


def _split(url: str) -> tuple[str, str]:
    """(parent folder, name); a bare file name is in "."."""
    url = url.rstrip("/")
    return tuple(url.rsplit("/", 1)) if "/" in url else (".", url)


def metadata_files(sources: list[Source], options: dict | None) -> list[tuple[int, InputFile]]:
    """(source index, parquet) of every source, in source then name order."""
    out = []
    for i, s in enumerate(sources):
        folder = DataFolder(s.metadata, options)
        names = folder.list(suffix=".parquet")
        if not names:
            raise UserError(f"{folder.url}: no .parquet files (source {s.name!r})")
        out.extend((i, InputFile(f"{j:08d}", folder.url_of(n))) for j, n in enumerate(names))
    return out


def shard_files(sources: list[Source], options: dict | None) -> list[tuple[int, str, str]]:
    """(source index, part id, tar URL) of every source with shards."""
    out = []
    for i, s in enumerate(sources):
        if not s.shards:
            continue
        folder = DataFolder(s.shards, options)
        names = folder.list(suffix=".tar")
        if not names:
            raise UserError(f"{folder.url}: no .tar shards (source {s.name!r})")
        out.extend((i, f"{j:08d}", folder.url_of(n)) for j, n in enumerate(names))
    return out


def task_share(items: list, tasks: int, index: int) -> list:
    r = split_evenly(len(items), tasks, index)
    return items[r.start:r.stop]


def open_subset(url: str, scratch: str, options: dict | None):
    """A source's subset (jobs.reshard.subset's loader; copied to scratch first when remote)."""
    from jobs.reshard.subset import load_subset_url

    return load_subset_url(url, options, scratch)


def _save(work: DataFolder, rel: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    work.write_bytes(rel, buf.getvalue())


def _load(work: DataFolder, rel: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(work.read_bytes(rel))) as z:
        return {k: z[k] for k in z.files}


# -- sample (map) ---------------------------------------------------------------

def default_model(f: InputFile, options: dict | None) -> str:
    """The first (sorted) <model> with a <model>_img key in the file's npz."""
    parent, name = _split(f.npz_url)
    try:
        with DataFolder(parent, options).open(name) as fh, np.load(fh) as z:
            keys = sorted(k for k in z.files if k.endswith("_img"))
    except FileNotFoundError:
        raise UserError(f"{f.npz_url}: embeddings file not found (the bias probe's img/txt features need it)") from None
    if not keys:
        raise UserError(f"{f.npz_url}: no <model>_img key (has {', '.join(z.files)})")
    return keys[0][: -len("_img")]


def sample_file(src: int, source: Source, f: InputFile, subset, samples: int, seed: int, model: str,
                features: list[str], work: DataFolder, options: dict | None) -> dict:
    """The `samples` lowest-priority eligible rows of one file -> CANDIDATES/SRC-PID.npz; returns counts."""
    from dcslurm.datacomp.pool import parse_uids
    from jobs.filter.rules import uniform_by_uid

    reader = Reader(options)
    cols, n = reader.table(f, ["uid"])
    hi, lo = parse_uids(cols["uid"], f.url)
    eligible = np.ones(n, bool) if subset is None else subset.lookup_many(hi, lo)[1] > 0
    prio = uniform_by_uid(hi, lo, seed, stream=1000 + src)  # another stream per source: two samples of one pool differ
    idx = np.flatnonzero(eligible)
    idx = idx[np.lexsort((lo[idx], hi[idx], prio[idx]))][:samples]
    idx.sort()
    arrays = {"hi": hi[idx], "lo": lo[idx], "prio": prio[idx]}
    if not model and any(feat in EMBEDDING_FEATURES for feat in features):
        model = default_model(f, options)
    for feat in features:
        if feat in EMBEDDING_FEATURES:
            arrays[feat] = np.asarray(reader.embeddings(f, f"{model}_{feat}", n)[idx], np.float32)
    _save(work, f"{CANDIDATES}/{src:03d}-{f.pid}.npz", **arrays)
    return {"rows": int(n), "eligible": int(eligible.sum()), "candidates": int(len(idx))}


def sample_task(sources: list[Source], files: list[tuple[int, InputFile]], samples: int, seed: int, model: str,
                features: list[str], work: DataFolder, scratch: str, options: dict | None) -> dict:
    """sample_file over `files` (a task's share); one subset load per source."""
    subsets: dict[int, object] = {}
    totals = {"files": 0, "rows": 0, "eligible": 0, "candidates": 0}
    for src, f in files:
        if src not in subsets:
            s = sources[src]
            subsets[src] = open_subset(s.subset, scratch, options) if s.subset else None
        c = sample_file(src, sources[src], f, subsets[src], samples, seed, model, features, work, options)
        totals["files"] += 1
        for k in ("rows", "eligible", "candidates"):
            totals[k] += c[k]
    return totals


def select(sources: list[Source], files: list[tuple[int, InputFile]], samples: int, work: DataFolder) -> dict:
    """Per source: the chosen rows (lowest priorities), the same count for every source (balanced classes).

    Returns {"n": rows per source, "available": [eligible candidates per source], "rows": [dict per source]}.
    """
    per: list[dict[str, list]] = [{} for _ in sources]
    for src, f in files:
        part = _load(work, f"{CANDIDATES}/{src:03d}-{f.pid}.npz")
        for k, v in part.items():
            per[src].setdefault(k, []).append(v)
    merged, available = [], []
    for src, parts in enumerate(per):
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        if not cat or not len(cat["hi"]):
            raise UserError(f"{sources[src].metadata}: source {sources[src].name!r} has no rows to sample "
                            "(empty, or its subset keeps none of them)")
        order = np.lexsort((cat["lo"], cat["hi"], cat["prio"]))
        merged.append({k: v[order] for k, v in cat.items()})
        available.append(int(len(order)))
    n = min(samples, *available)
    return {"n": n, "available": available, "rows": [{k: v[:n] for k, v in m.items()} for m in merged]}


# -- images (map) ---------------------------------------------------------------

def _pool(arr: np.ndarray, side: int = FEATURE_SIDE) -> np.ndarray:
    """Average-pool an HxWxC array to side x side x C."""
    h, w = arr.shape[:2]
    c = arr.shape[2] if arr.ndim == 3 else 1
    a = arr.reshape(h, w, c).astype(np.float32)
    return a.reshape(side, h // side, side, w // side, c).mean(axis=(1, 3))


def transform_features(image, uid_seed: int) -> dict[str, np.ndarray]:
    """Every transformation's fixed feature vector (float32, pixel values in [0, 1]) for one PIL image."""
    from PIL import ImageFilter

    img = image.convert("RGB").resize((WORK_SIDE, WORK_SIDE), resample=3)
    rgb = np.asarray(img, np.float32) / 255.0
    rng = np.random.default_rng(uid_seed)
    out = {"grayscale": _pool(np.asarray(img.convert("L"), np.float32) / 255.0),
           "mean_colour": rgb.reshape(-1, 3).mean(axis=0),
           "lowpass": _pool(np.asarray(img.filter(ImageFilter.GaussianBlur(4)), np.float32) / 255.0)}
    blur = np.asarray(img.filter(ImageFilter.GaussianBlur(2)), np.float32) / 255.0
    out["highpass"] = _pool(np.abs(rgb - blur), FEATURE_SIDE)  # the detail the blur removes (magnitude)
    flat = rgb.reshape(-1, 3)
    out["pixel_shuffle"] = _pool(flat[rng.permutation(len(flat))].reshape(rgb.shape))
    p = WORK_SIDE // PATCH_GRID
    patches = rgb.reshape(PATCH_GRID, p, PATCH_GRID, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p, p, 3)
    patches = patches[rng.permutation(len(patches))].reshape(PATCH_GRID, PATCH_GRID, p, p, 3)
    out["patch_shuffle"] = _pool(patches.transpose(0, 2, 1, 3, 4).reshape(rgb.shape))
    out["edges"] = _pool(np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), np.float32) / 255.0)
    return {k: np.ascontiguousarray(v, np.float32).ravel() for k, v in out.items()}


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def images_file(src: int, pid: str, url: str, chosen: set[tuple[int, int]], transforms: list[str],
                work: DataFolder, scratch: str, options: dict | None) -> dict:
    """Transformations of the chosen samples found in one tar -> IMAGES/SRC-PID.npz; returns counts."""
    from PIL import Image

    from jobs.reshard.subset import uid_to_pair
    from jobs.reshard.tario import open_tar

    parent, name = _split(url)
    counts = {"scanned": 0, "found": 0, "bad_image": 0, "bad_json": 0}
    his, los, feats = [], [], {t: [] for t in transforms}
    with open_tar(DataFolder(parent, options), name, scratch, url) as reader:
        for sample in reader:
            counts["scanned"] += 1
            uid, problem = sample.uid()
            if uid is None:
                counts["bad_json"] += 1
                continue
            try:
                pair = uid_to_pair(uid)
            except ValueError:
                counts["bad_json"] += 1
                continue
            if pair not in chosen:
                continue
            member = next((m for e in IMAGE_EXTS if (m := sample.member(e)) is not None), None)
            try:
                if member is None:
                    raise ValueError("no image member")
                sample.load()
                with Image.open(io.BytesIO(bytes(member.data))) as im:
                    im.load()
                    f = transform_features(im, (pair[0] ^ pair[1]) & 0xFFFFFFFF)
            except Exception:  # noqa: BLE001 - an undecodable image is counted, not fatal
                counts["bad_image"] += 1
                continue
            counts["found"] += 1
            his.append(pair[0])
            los.append(pair[1])
            for t in transforms:
                feats[t].append(f[t])
    arrays = {"hi": np.array(his, np.uint64), "lo": np.array(los, np.uint64)}
    for t in transforms:
        arrays[t] = np.stack(feats[t]) if feats[t] else np.zeros((0, 1), np.float32)
    _save(work, f"{IMAGES}/{src:03d}-{pid}.npz", **arrays)
    return counts


def images_task(sources: list[Source], all_files: list[tuple[int, InputFile]], tars: list[tuple[int, str, str]],
                samples: int, transforms: list[str], work: DataFolder, scratch: str, options: dict | None) -> dict:
    """images_file over `tars` (a task's share), for the rows `select` chooses."""
    totals = {"tars": 0, "scanned": 0, "found": 0, "bad_image": 0, "bad_json": 0}
    if not transforms or not tars:
        return totals
    chosen_rows = select(sources, all_files, samples, work)["rows"]
    chosen = [set(zip(r["hi"].tolist(), r["lo"].tolist())) for r in chosen_rows]
    for src, pid, url in tars:
        c = images_file(src, pid, url, chosen[src], transforms, work, scratch, options)
        totals["tars"] += 1
        for k in c:
            totals[k] += c[k]
    return totals


# -- probe (reduce) -------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def classify(x: np.ndarray, y: np.ndarray, k: int, test_fraction: float, seed: int) -> dict:
    """Standardised features, seeded stratified split, logistic regression: accuracy, CI, test, confusion."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(xtr), ytr)
    pred = clf.predict(scaler.transform(xte))
    correct, n = int((pred == yte).sum()), len(yte)
    chance = float(np.bincount(yte, minlength=k).max() / n)  # majority class of the test set (1/k when balanced)
    lo, hi = wilson_interval(correct, n)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (yte, pred), 1)
    return {"train": int(len(ytr)), "test": n, "accuracy": correct / n, "ci95": [lo, hi], "chance": chance,
            "p_value": float(binomtest(correct, n, chance, alternative="greater").pvalue),
            "chance_in_ci": lo <= chance <= hi, "confusion": confusion.tolist()}


def probe(sources: list[Source], files: list[tuple[int, InputFile]], tars: list[tuple[int, str, str]], samples: int,
          features: list[str], test_fraction: float, seed: int, work: DataFolder) -> dict:
    """Classify source from each feature set; the report's content."""
    sel = select(sources, files, samples, work)
    k = len(sources)
    results, notes = {}, []
    img_parts: list[dict[str, list]] = [{} for _ in sources]
    for src, pid, _ in tars:
        part = _load(work, f"{IMAGES}/{src:03d}-{pid}.npz")
        for key, v in part.items():
            img_parts[src].setdefault(key, []).append(v)
    for feat in features:
        xs, ys, missing = [], [], 0
        for src, rows in enumerate(sel["rows"]):
            if feat in EMBEDDING_FEATURES:
                xs.append(rows[feat])
                ys.append(np.full(len(rows[feat]), src))
                continue
            parts = img_parts[src]
            if not parts:
                missing += len(rows["hi"])
                continue
            hi, lo, fx = (np.concatenate(parts[key]) for key in ("hi", "lo", feat))
            where = {pair: i for i, pair in enumerate(zip(hi.tolist(), lo.tolist()))}
            idx = [where.get(pair, -1) for pair in zip(rows["hi"].tolist(), rows["lo"].tolist())]
            have = np.array([i for i in idx if i >= 0], np.int64)
            missing += sum(1 for i in idx if i < 0)
            xs.append(fx[have])
            ys.append(np.full(len(have), src))
        y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        if len(set(y.tolist())) < k or np.bincount(y, minlength=k).min() < 2:
            results[feat] = {"error": "too few items with this feature in some source", "missing": missing}
            continue
        try:
            r = classify(np.concatenate(xs).astype(np.float32), y, k, test_fraction, seed)
        except ValueError as exc:  # e.g. a held-out set smaller than the number of sources
            results[feat] = {"error": f"cannot split/train: {exc}".replace("\n", " "), "missing": missing}
            continue
        r["missing"] = missing
        results[feat] = r
    if any(f in TRANSFORMS for f in features):
        notes.append(FEATURE_NOTE)
    return {"sources": [{"name": s.name, "metadata": s.metadata, "subset": s.subset, "shards": s.shards,
                         "eligible_candidates": a} for s, a in zip(sources, sel["available"])],
            "samples_per_source": sel["n"], "seed": seed, "test_fraction": test_fraction,
            "classifier": "sklearn LogisticRegression (lbfgs) on standardised features",
            "interval": "95% Wilson score interval of held-out accuracy; p = exact one-sided binomial test vs chance",
            "features": results, "notes": notes}


def markdown(report: dict) -> str:
    names = [s["name"] for s in report["sources"]]
    lines = ["# Dataset-bias probe", "",
             f"Sources: {', '.join(f'`{n}`' for n in names)}; {report['samples_per_source']} items each "
             f"(seed {report['seed']}), {report['test_fraction']:.0%} held out. Classifier: {report['classifier']}. "
             f"{report['interval']}.", "",
             "| features | train | test | accuracy | 95% CI | chance | p (vs chance) | chance in CI |",
             "|---|---:|---:|---:|---|---:|---:|:-:|"]
    for feat, r in report["features"].items():
        if "error" in r:
            lines.append(f"| {feat} | - | - | - | {r['error']} | - | - | - |")
            continue
        lines.append(f"| {feat} | {r['train']} | {r['test']} | {r['accuracy']:.3f} | "
                     f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['chance']:.3f} | {r['p_value']:.3g} | "
                     f"{'yes' if r['chance_in_ci'] else 'no'} |")
    lines.append("")
    for feat, r in report["features"].items():
        if "error" in r:
            continue
        lines += [f"## Confusion matrix: {feat}", "", "| true \\ predicted | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for name, row in zip(names, r["confusion"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    lines += [n for n in report["notes"]]
    return "\n".join(lines) + "\n"


def chart_png(report: dict) -> bytes:
    """Held-out accuracy per feature set with its 95% CI; chance as a dashed line."""
    plt = pyplot()
    items = [(f, r) for f, r in report["features"].items() if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.35 * max(len(items), 1)))
    y = np.arange(len(items))
    acc = np.array([r["accuracy"] for _, r in items])
    err = np.array([[r["accuracy"] - r["ci95"][0], r["ci95"][1] - r["accuracy"]] for _, r in items]).T
    ax.barh(y, acc, xerr=err if len(items) else None, capsize=3, color="tab:blue")
    if items:
        ax.axvline(items[0][1]["chance"], color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, [f for f, _ in items])
    ax.set_xlim(0, 1)
    ax.set_xlabel("held-out accuracy (95% CI); dashed = chance")
    ax.set_title("Which source? accuracy by feature set")
    fig.tight_layout()
    return png_bytes(fig)


def write_report(report: dict, out: DataFolder) -> list[str]:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["features", "train", "test", "accuracy", "ci_low", "ci_high", "chance", "p_value", "missing"])
    for feat, r in report["features"].items():
        if "error" not in r:
            w.writerow([feat, r["train"], r["test"], r["accuracy"], r["ci95"][0], r["ci95"][1], r["chance"],
                        r["p_value"], r["missing"]])
    out.write_bytes("bias_accuracy.png", chart_png(report))
    out.write_text("bias.csv", buf.getvalue())
    out.write_text("bias.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    out.write_text("bias.md", markdown(report))
    return ["bias.md", "bias.csv", "bias.json", "bias_accuracy.png"]


def run_local(sources: list[Source], samples: int, features: list[str], work: DataFolder, out: DataFolder,
              seed: int = 0, model: str = "", test_fraction: float = 0.3, scratch: str | None = None,
              options: dict | None = None) -> dict:
    """The whole probe on this machine (what `dcslurm audit bias` does): the stage's three steps as one task."""
    import tempfile

    scratch = scratch or tempfile.mkdtemp(prefix="dcslurm-bias-")
    files = metadata_files(sources, options)
    transforms = [f for f in features if f in TRANSFORMS]
    tars = shard_files(sources, options) if transforms else []
    sample_task(sources, files, samples, seed, model, features, work, scratch, options)
    images_task(sources, files, tars, samples, transforms, work, scratch, options)
    report = probe(sources, files, tars, samples, features, test_fraction, seed, work)
    write_report(report, out)
    return report
