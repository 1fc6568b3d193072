"""Eval sets in clip_benchmark's webdataset layout, read through DataFolder
(local disk or S3):

    ROOT/wds_<task>_test/
        classnames.txt                           one class name a line (classification)
        zeroshot_classification_templates.txt    one template a line, "{c}" = class name
        dataset_type.txt                         optional: "retrieval" (default classification)
        test/nshards.txt                         number of shards
        test/0.tar ... test/{n-1}.tar            KEY.jpg|png|webp + KEY.cls (classification),
                                                 + KEY.npy (WILDS / fairness metadata),
                                                 or KEY.txt captions one a line (retrieval)

WinoGAViL (our layout, since DataComp reads it from a Hugging Face dataset):
each sample is KEY.json {"cue", "candidates", "associations"} with the
candidate images KEY.<i>.jpg in candidate order; dataset_type.txt "winogavil".
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from jobs.wds import CorruptShard, tar_samples

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


@dataclass
class EvalSet:
    folder: DataFolder
    dataset_type: str  # classification | retrieval | winogavil
    nshards: int
    classnames: list[str] | None
    templates: list[str] | None
    split: str = "test"
    skipped: Counter = field(default_factory=Counter)  # tar members that are no sample field, by reason

    @classmethod
    def open(cls, folder: DataFolder, split: str = "test", need_classes: bool = True) -> EvalSet:
        """Read the set's metadata; one-line UserError naming the missing file."""
        nshards_rel = f"{split}/nshards.txt"
        if not folder.exists(nshards_rel):
            if not folder.exists():
                raise UserError(f"{folder.url}: eval set folder does not exist "
                                f"(dcslurm evalsets prepare --out ROOT mirrors the published sets)")
            raise UserError(f"{folder.url_of(nshards_rel)}: missing; an eval set needs {split}/nshards.txt")
        text = folder.read_text(nshards_rel).strip()
        try:
            nshards = int(text)
        except ValueError:
            raise UserError(f"{folder.url_of(nshards_rel)}: not a number of shards: {text[:40]!r}") from None
        if nshards < 1:
            raise UserError(f"{folder.url_of(nshards_rel)}: needs at least 1 shard, says {nshards}")
        dataset_type = "classification"
        if folder.exists("dataset_type.txt"):
            dataset_type = folder.read_text("dataset_type.txt").strip().lower() or "classification"
        classnames = templates = None
        if dataset_type == "classification":
            classnames = _lines(folder, "classnames.txt", need_classes)
            templates = _lines(folder, "zeroshot_classification_templates.txt", need_classes)
        return cls(folder=folder, dataset_type=dataset_type, nshards=nshards, classnames=classnames,
                   templates=templates, split=split)

    def shard_names(self) -> list[str]:
        return [f"{self.split}/{i}.tar" for i in range(self.nshards)]

    def samples(self) -> Iterator[dict[str, bytes]]:
        """Samples in shard order: {"__key__": key, "__shard__": rel, ext: bytes, ...}, grouped
        by jobs.wds.tar_samples; members that are no sample field are counted in `skipped`."""
        for rel in self.shard_names():
            if not self.folder.exists(rel):
                raise UserError(f"{self.folder.url_of(rel)}: missing shard (nshards.txt says {self.nshards})")
            with self.folder.open(rel, "rb") as raw:
                try:
                    for sample in tar_samples(raw, self.folder.url_of(rel), self.skipped):
                        sample["__shard__"] = rel
                        yield sample
                except CorruptShard as exc:  # a damaged eval set is bad input: its score would be wrong
                    raise UserError(str(exc)) from None


def _lines(folder: DataFolder, rel: str, required: bool) -> list[str] | None:
    if not folder.exists(rel):
        if required:
            raise UserError(f"{folder.url_of(rel)}: missing; a zero-shot classification set needs {rel}")
        return None
    lines = [line.strip() for line in folder.read_text(rel).splitlines() if line.strip()]
    if required and not lines:
        raise UserError(f"{folder.url_of(rel)}: empty")
    return lines


def image_bytes(sample: dict[str, bytes]) -> bytes | None:
    """The sample's image, preferring the extensions in clip_benchmark's order."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def decode_image(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def decode_label(data: bytes) -> int:
    return int(data.decode("utf-8").strip())


def decode_npy(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)
