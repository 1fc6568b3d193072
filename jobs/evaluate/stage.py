"""Evaluation step code (see spec.py): one eval task per unit, then a gather."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder, is_remote
from dcslurm.core.task import TaskContext, TaskResult
from dcslurm.datacomp.tasks import Task, get_task
from jobs.evaluate import metrics as M
from jobs.evaluate.evalset import EvalSet, decode_label, decode_npy, image_bytes

TASKS_DIR = "tasks"
RESULTS_FILE = "results.jsonl"

# Per-sample metadata columns (.npy) of the WILDS and fairness sets, as DataComp reads them.
METADATA_FIELDS = {
    "wilds/iwildcam": ["location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"],
    "wilds/camelyon17": ["hospital", "slide", "y"],
    "wilds/fmow": ["region", "year", "y"],
    "fairness/dollar_street": ["income_ds", "income_meta", "region"],
    "fairness/geode": ["region", "country"],
}


def task_result_name(key: str) -> str:
    return f"{TASKS_DIR}/{key.replace('/', '__')}.json"


def evalset_folder(root: DataFolder, task: Task) -> DataFolder:
    """The task's eval set: `evalset` as a full URL/path, else ROOT/<evalset_dir>."""
    if task.evalset and (is_remote(task.evalset) or task.evalset.startswith("/")):
        return DataFolder(task.evalset, root.storage_options)
    return root.child(task.evalset_dir)


class Evaluator:
    """A loaded model plus what evaluating a task needs; reused across a task's units."""

    def __init__(self, model_name: str, checkpoint: str, device: str, batch_size: int, num_workers: int):
        from jobs.evaluate.zeroshot import ImageEncoder, load_model

        self.model, self.preprocess, self.tokenizer = load_model(model_name, checkpoint, device)
        self.device, self.batch_size = device, batch_size
        self.images = ImageEncoder(self.model, self.preprocess, device, num_workers)

    def evaluate(self, task: Task, evalset_root: DataFolder) -> tuple[dict, dict]:
        """(metrics with main_metric, stats) of one task."""
        folder = evalset_folder(evalset_root, task)
        if task.kind == "multilabel_faces":
            raise UserError(f"{task.key}: FairFace/UTKFace (unscored) evaluation is not implemented")
        evalset = EvalSet.open(folder, need_classes=task.kind not in ("retrieval", "winogavil"))
        if task.kind == "retrieval" or evalset.dataset_type == "retrieval":
            metrics, stats = self._retrieval(evalset)
        elif task.kind == "winogavil" or evalset.dataset_type == "winogavil":
            metrics, stats = self._winogavil(evalset)
        else:
            metrics, stats = self._classification(task, evalset)
        stats.update({f"skipped_{k}": v for k, v in sorted(evalset.skipped.items())})  # tar members, jobs.wds
        if task.main_metric not in metrics:  # a null main metric would drop the task from every table silently
            raise UserError(f"{task.key}: main_metric {task.main_metric!r} is not among this task's metrics "
                            f"({', '.join(sorted(metrics))})")
        metrics["main_metric"] = metrics[task.main_metric]
        return metrics, stats

    # -- classification (plain, WILDS, fairness) ------------------------------
    def _classification(self, task: Task, evalset: EvalSet) -> tuple[dict, dict]:
        import torch

        from jobs.evaluate.zeroshot import batched, zero_shot_classifier

        classifier = zero_shot_classifier(self.model, self.tokenizer, evalset.classnames, evalset.templates,
                                          self.device).cpu().float()
        n_classes = len(evalset.classnames)
        needs_meta = task.key in METADATA_FIELDS
        logits, labels, meta = [], [], []
        skipped = 0
        unusable = {"samples": 0}
        for batch in batched(_labelled(evalset, needs_meta, unusable), self.batch_size):
            good = []
            for img, label, m in batch:
                if not 0 <= label < n_classes:
                    skipped += 1
                    continue
                good.append((img, label, m))
            try:
                emb = self.images.encode([g[0] for g in good]) if good else None
            except (OSError, ValueError):  # an undecodable image (PIL): encode the batch image by image
                emb, good, bad = self._encode_each(good)
                skipped += bad
            if emb is None or not good:
                continue
            with torch.no_grad():
                logits.append((100.0 * emb @ classifier).numpy())
            labels.extend(g[1] for g in good)
            meta.extend(g[2] for g in good)
        skipped += unusable["samples"]
        if not labels:
            raise UserError(f"{evalset.folder.url}: no usable samples (skipped {skipped})")
        logit = np.concatenate(logits)
        target = np.asarray(labels)
        metrics = M.classification_metrics(logit, target, n_classes)
        if needs_meta:
            metrics.update(self._group_metrics(task, logit, target, np.stack(meta)))
        return metrics, {"samples": len(target), "skipped": skipped, "classes": n_classes}

    def _encode_each(self, good):
        import torch

        kept, embs, bad = [], [], 0
        for g in good:
            try:
                embs.append(self.images.encode([g[0]]))
                kept.append(g)
            except (OSError, ValueError):  # an undecodable image is a skipped sample
                bad += 1
        return (torch.cat(embs) if embs else None), kept, bad

    def _group_metrics(self, task: Task, logits: np.ndarray, target: np.ndarray, meta: np.ndarray) -> dict:
        fields = METADATA_FIELDS[task.key]
        meta = meta.reshape(len(target), -1)
        if meta.shape[1] < len(fields):
            raise UserError(f"{task.key}: .npy metadata has {meta.shape[1]} columns, expected {fields}")
        col = {f: meta[:, i].astype(np.int64) for i, f in enumerate(fields)}
        pred = logits.argmax(axis=1)
        out: dict = {}
        if task.key == "wilds/iwildcam":
            out["acc_avg"] = float((pred == target).mean())
            out["recall-macro_all"] = M.macro_recall(target, pred)
            out["F1-macro_all"] = M.macro_f1(target, pred)
        elif task.key == "wilds/camelyon17":
            out.update(_renamed(M.group_metrics(pred == target, col["slide"], "acc"), "slide"))
        elif task.key == "wilds/fmow":
            by_year = _renamed(M.group_metrics(pred == target, col["year"], "acc"), "year")
            by_year["acc_worst_year"] = by_year.pop("acc_wg")
            by_region = _renamed(M.group_metrics(pred == target, col["region"], "acc"), "region")
            # DataComp's grouper sees numeric regions, so its "Other" exclusion never
            # matches: the worst region is over every region present, as here.
            by_region["acc_worst_region"] = by_region.pop("acc_wg")
            by_region.pop("acc_avg")
            out.update(by_year)
            out.update(by_region)
        elif task.key == "fairness/dollar_street":
            top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
            correct = (top5 == target[:, None]).any(axis=1)
            out.update(_renamed(M.group_metrics(correct, col["income_ds"], "acc_top5"), "income_ds"))
        elif task.key == "fairness/geode":
            out.update(_renamed(M.group_metrics(pred == target, col["region"], "acc"), "region"))
        return out

    # -- retrieval -------------------------------------------------------------
    def _retrieval(self, evalset: EvalSet) -> tuple[dict, dict]:
        import torch

        from jobs.evaluate.zeroshot import batched, encode_texts

        image_embs, text_embs, text_to_image = [], [], []
        skipped = 0
        n_images = 0
        samples = ((image_bytes(s), s.get("txt")) for s in evalset.samples())
        for batch in batched(samples, self.batch_size):
            good = [(img, txt.decode("utf-8", "replace").splitlines()) for img, txt in batch
                    if img is not None and txt is not None]
            skipped += len(batch) - len(good)
            good = [(img, caps) for img, caps in good if caps]
            if not good:
                continue
            image_embs.append(self.images.encode([g[0] for g in good]))
            captions = [c for _, caps in good for c in caps]
            text_embs.append(encode_texts(self.model, self.tokenizer, captions, self.device))
            text_to_image.extend(n_images + i for i, (_, caps) in enumerate(good) for _ in caps)
            n_images += len(good)
        if not n_images:
            raise UserError(f"{evalset.folder.url}: no usable image-caption samples")
        scores = (torch.cat(text_embs) @ torch.cat(image_embs).T).numpy()
        metrics = M.retrieval_recall(scores, np.asarray(text_to_image), ks=(1, 5, 10))
        return metrics, {"samples": n_images, "captions": len(text_to_image), "skipped": skipped}

    # -- WinoGAViL ---------------------------------------------------------------
    def _winogavil(self, evalset: EvalSet) -> tuple[dict, dict]:
        from jobs.evaluate.zeroshot import encode_texts

        scores, sizes, skipped = [], [], 0
        for s in evalset.samples():
            try:
                info = json.loads(s["json"])
                cands, assoc = list(info["candidates"]), set(info["associations"])
                images = [s[f"{i}.jpg"] if f"{i}.jpg" in s else s[f"{i}.png"] for i in range(len(cands))]
            except (KeyError, ValueError, TypeError):
                skipped += 1
                continue
            y_true = np.isin(cands, list(assoc))
            cue = info["cue"].lower()
            prompt = f"An {cue}" if cue[:1] in "aeiou" else f"A {cue}"
            img_emb = self.images.encode(images)
            txt_emb = encode_texts(self.model, self.tokenizer, [prompt], self.device)
            sims = (txt_emb @ img_emb.T).numpy()[0]
            y_pred = M.winogavil_prediction(sims, int(y_true.sum()))
            scores.append(M.jaccard(y_true, y_pred))
            sizes.append(len(cands))
        if not scores:
            raise UserError(f"{evalset.folder.url}: no usable WinoGAViL samples")
        return M.winogavil_metrics(scores, sizes), {"samples": len(scores), "skipped": skipped}


def _labelled(evalset: EvalSet, needs_meta: bool, unusable: dict):
    """(image bytes, label, metadata) per usable sample; counts the others in unusable["samples"]."""
    for s in evalset.samples():
        img, cls = image_bytes(s), s.get("cls")
        meta = s.get("npy") if needs_meta else None
        if img is None or cls is None or (needs_meta and meta is None):
            unusable["samples"] += 1
            continue
        try:
            yield img, decode_label(cls), decode_npy(meta) if needs_meta else None
        except (ValueError, UnicodeDecodeError):
            unusable["samples"] += 1


def _renamed(group_out: dict, field: str) -> dict:
    """WILDS-style names: acc_group:3 -> acc_region:3, count_group:3 -> count_region:3."""
    return {k.replace("group:", f"{field}:"): v for k, v in group_out.items()}


def _device(requested: str) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_checkpoint(ctx: TaskContext) -> str:
    url = ctx.params.checkpoint or ctx.run.url_of("train/model.pt")
    if not is_remote(url):
        return url
    parent, name = url.rstrip("/").rsplit("/", 1)
    folder = ctx.folder(parent)
    if not folder.exists(name):
        raise UserError(f"{url}: checkpoint does not exist")
    local = os.path.join(ctx.scratch, name)
    with folder.open(name, "rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return local


def evaluate_tasks(ctx: TaskContext) -> TaskResult:
    """Evaluate this array task's eval tasks; each result committed as RUN/eval/tasks/<key>.json."""
    from jobs.evaluate.spec import selected_tasks

    selected_tasks(ctx.params)  # registers the run's extra tasks in this process
    keys = ctx.input_names()
    root = ctx.folder(ctx.params.evalsets)
    evaluator = None
    outputs, stats = [], {}
    for key in keys:
        task = get_task(key)
        rel = task_result_name(task.key)
        if ctx.output.exists(rel):  # committed by an earlier attempt of this task
            outputs.append(f"{ctx.step.stage}/{rel}")
            continue
        if task.kind != "multilabel_faces":  # check the eval set before paying for the model
            EvalSet.open(evalset_folder(root, task), need_classes=task.kind not in ("retrieval", "winogavil"))
        if evaluator is None:
            evaluator = Evaluator(ctx.params.model or ctx.scale.model, _local_checkpoint(ctx),
                                  _device(ctx.params.device), ctx.params.batch_size,
                                  ctx.params.num_workers)
        started = time.time()
        metrics, task_stats = evaluator.evaluate(task, root)
        task_stats["seconds"] = round(time.time() - started, 3)
        ctx.output.write_json(rel, {"key": task.key, "dataset": task.name, "metrics": metrics})
        ctx.log.info("%s: %s = %s (%s)", task.name, task.main_metric, metrics["main_metric"], task_stats)
        outputs.append(f"{ctx.step.stage}/{rel}")
        stats[task.key] = task_stats
    if evaluator is not None:
        evaluator.images.close()
    return TaskResult(outputs=outputs, stats=stats)


def gather(ctx: TaskContext) -> TaskResult:
    """Write RUN/eval/results.jsonl: lines of other tasks already there are kept,
    then one line per selected task in selection order (DataComp's format)."""
    from jobs.evaluate.spec import selected_tasks

    tasks = selected_tasks(ctx.params)
    records = []
    for task in tasks:
        rel = task_result_name(task.key)
        if not ctx.output.exists(rel):
            raise UserError(f"{ctx.output.url_of(rel)}: missing; eval task {task.key} did not commit a result")
        records.append(ctx.output.read_json(rel))
    names = {r["dataset"] for r in records}
    kept = []
    if ctx.output.exists(RESULTS_FILE):
        for line in ctx.output.read_text(RESULTS_FILE).splitlines():
            if line.strip() and json.loads(line).get("dataset") not in names:
                kept.append(line)
    lines = kept + [json.dumps(r) for r in records]
    ctx.output.write_text(RESULTS_FILE, "\n".join(lines) + "\n")
    return TaskResult(outputs=[f"{ctx.step.stage}/{RESULTS_FILE}"],
                      stats={"tasks": len(records), "kept_lines": len(kept)})
