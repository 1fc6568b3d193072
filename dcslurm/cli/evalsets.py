"""`dcslurm evalsets`: put DataComp's eval sets where compute nodes can read them.

`prepare` mirrors the published sets into a folder or bucket (for clusters
whose compute nodes have no internet):
- classification sets (incl. WILDS and fairness): the Hugging Face dataset
  repos `djghosh/wds_<task>_test`, copied file by file (clip_benchmark layout);
- Flickr30k / MSCOCO retrieval and WinoGAViL: DataComp reads these as Hugging
  Face `datasets` (`nlphuji/...`); they are converted to our webdataset layout
  (see jobs/evaluate/evalset.py), which needs the `datasets` package.
With `--source DIR` it copies a local copy of the sets instead (e.g. made on a
machine with internet), no network needed.
Files already present with the same size are skipped, so a rerun resumes.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Optional

import typer
from rich.console import Console

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder, s3fs_options
from dcslurm.datacomp.tasks import Task, select_tasks

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Eval sets for the eval stage.")
console = Console()

HF_ORG = "djghosh"
SAMPLES_PER_SHARD = 1000


def hf_repo(task: Task) -> str:
    """The Hugging Face dataset repo DataComp downloads a classification task from."""
    return f"{HF_ORG}/{task.evalset_dir}"


def is_hf_datasets_task(task: Task) -> bool:
    """Flickr, MSCOCO and WinoGAViL come from `datasets` (nlphuji/...), not webdataset repos."""
    return task.key.startswith(("retrieval/", "misc/"))


def copy_tree(src: DataFolder, dst: DataFolder, rel: str = "") -> tuple[int, int]:
    """Copy every file under src/rel to dst/rel; (copied, skipped as already there)."""
    copied = skipped = 0
    path = src._path(rel)
    try:
        entries = src.fs.ls(path, detail=True)
    except FileNotFoundError:
        raise UserError(f"{src.url_of(rel)}: no such folder") from None
    for e in sorted(entries, key=lambda e: e["name"]):
        name = os.path.basename(e["name"].rstrip("/"))
        sub = f"{rel}/{name}" if rel else name
        if e["type"] == "directory":
            c, s = copy_tree(src, dst, sub)
            copied, skipped = copied + c, skipped + s
        elif dst.exists(sub) and dst.size(sub) == e["size"]:
            skipped += 1
        else:
            if src.is_local:
                dst.put_file(src.url_of(sub), sub)
            else:
                dst.write_bytes(sub, src.read_bytes(sub))
            copied += 1
    return copied, skipped


def mirror_from_hub(task: Task, out: DataFolder, scratch: str) -> tuple[int, int]:
    """Download `djghosh/wds_<task>_test` file by file into out/<evalset_dir>."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise UserError("evalsets prepare: needs huggingface_hub (pip install huggingface_hub)") from None
    repo = hf_repo(task)
    dest = out.child(task.evalset_dir)
    api = HfApi()
    try:
        files = [f for f in api.list_repo_files(repo, repo_type="dataset") if not f.startswith(".")]
        infos = {i.path: i.size for i in api.get_paths_info(repo, files, repo_type="dataset")}
    except Exception as exc:  # noqa: BLE001 - network/hub errors become one line
        raise UserError(f"{repo}: cannot list the Hugging Face repo ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    copied = skipped = 0
    for rel in files:
        if dest.exists(rel) and infos.get(rel) is not None and dest.size(rel) == infos[rel]:
            skipped += 1
            continue
        local = hf_hub_download(repo, rel, repo_type="dataset", cache_dir=scratch)
        dest.put_file(local, rel)
        os.remove(os.path.realpath(local))  # keep the scratch small: one file at a time
        copied += 1
    return copied, skipped


def convert_hf_dataset(task: Task, out: DataFolder) -> int:
    """Convert DataComp's `nlphuji/<name>` Hugging Face dataset into out/<evalset_dir>."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{task.key}: converting nlphuji/{task.key.split('/', 1)[1]} needs the `datasets` "
                        f"package (pip install datasets)") from None
    name = task.key.split("/", 1)[1]
    ds = datasets.load_dataset(f"nlphuji/{name}", split="test")
    dest = out.child(task.evalset_dir)
    shard, n = [], 0
    nshards = 0
    for i, ex in enumerate(ds):
        shard.append(_winogavil_sample(i, ex) if task.kind == "winogavil" else _retrieval_sample(i, ex))
        if len(shard) == SAMPLES_PER_SHARD:
            dest.write_bytes(f"test/{nshards}.tar", _tar(shard))
            nshards, n, shard = nshards + 1, n + len(shard), []
    if shard:
        dest.write_bytes(f"test/{nshards}.tar", _tar(shard))
        nshards, n = nshards + 1, n + len(shard)
    dest.write_text("test/nshards.txt", f"{nshards}\n")
    dest.write_text("dataset_type.txt", "winogavil\n" if task.kind == "winogavil" else "retrieval\n")
    return n


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _retrieval_sample(i: int, ex: dict) -> dict[str, bytes]:
    captions = ex["caption"] if isinstance(ex["caption"], list) else [ex["caption"]]
    return {"__key__": f"{i:08d}", "jpg": _jpeg(ex["image"]),
            "txt": "\n".join(c.replace("\n", " ") for c in captions).encode()}


def _winogavil_sample(i: int, ex: dict) -> dict[str, bytes]:
    import json

    sample = {"__key__": f"{i:08d}", "json": json.dumps({
        "cue": ex["cue"], "candidates": list(ex["candidates"]), "associations": list(ex["associations"])}).encode()}
    for j, img in enumerate(ex["candidate_images"]):
        sample[f"{j}.jpg"] = _jpeg(img)
    return sample


def _tar(samples: list[dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@app.command()
def prepare(
    out: str = typer.Option(..., "--out", help="Folder or s3:// prefix to write the eval sets to."),
    tasks: str = typer.Option("all", help='"all" (DataComp\'s 40), "scored" (38), or comma-separated task keys.'),
    source: Optional[str] = typer.Option(None, help="Copy from this local/remote copy of the sets instead of "
                                                    "downloading (no network)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// URLs."),
) -> None:
    """Mirror DataComp's eval sets into OUT (one wds_<task>_test folder per task)."""
    import tempfile

    options = s3fs_options(endpoint_url=endpoint_url)
    dst = DataFolder(out, options)
    selected = select_tasks(tasks)
    failures = []
    for task in selected:
        try:
            if source:
                copied, skipped = copy_tree(DataFolder(source, options).child(task.evalset_dir),
                                            dst.child(task.evalset_dir))
                console.print(f"{task.name}: {copied} files copied, {skipped} already there")
            elif is_hf_datasets_task(task):
                n = convert_hf_dataset(task, dst)
                console.print(f"{task.name}: {n} samples converted from nlphuji/{task.key.split('/', 1)[1]}")
            else:
                with tempfile.TemporaryDirectory(prefix="dcslurm-evalsets-") as scratch:
                    copied, skipped = mirror_from_hub(task, dst, scratch)
                console.print(f"{task.name}: {copied} files downloaded from {hf_repo(task)}, {skipped} already there")
        except UserError as exc:
            failures.append(f"{task.name}: {exc}")
            console.print(f"[red]{task.name}[/red]: {exc}")
    if failures:
        raise UserError(f"{len(failures)} of {len(selected)} eval sets not prepared; first: {failures[0]}")
    console.print(f"eval sets in {dst.url}: set [stages.eval] evalsets = {dst.url!r}")
