"""Pool-level derived columns: per-row values computed from a metadata file once and reused by
every filter over that pool (the filters of a sweep, a resubmitted run, image_based's k-means
and its map).

    CACHE/<file id>/<column id>.npz     members `values` (one per row of the parquet, -1 where
                                        not computed yet) and `meta` (JSON: column id, file id, rows)

A column is what the rules compute from a row alone and what costs: fastText's language ID,
gcld3's, the caption lengths (characters, `text.split()` words, fastText tokens), the
text_based WordNet match, image_based's nearest centroid. Its value depends on

- the file's content: the file id hashes the parquet's URL, size and what changes when it is
  rewritten (local: mtime and inode; S3: ETag), and for cluster ids the npz's too;
- what computed it: the column id hashes the model file's bytes (fastText), the synset list's
  and the WordNet database's bytes, the centroids' bytes and the embedding key, the cld3-py
  version, and a version of each definition (bump it when a rule's code changes);

so a changed input or model reads another path and never a stale column.

Columns are partial: the rules compute a value only for the rows that still need it (language
ID after the cheaper caption tests, or only over the CLIP threshold in a `then` pipeline), and
a later filter computes just the rows still unknown and writes the union. A write is atomic
(DataFolder: temp name + rename, or one S3 object) and merges what another filter wrote to the
same column meanwhile, so two filters writing it at once both leave correct values (each one's
values are the same function of the row; at worst one's extra rows are lost and recomputed
later). A file that does not read back (truncated, bad zip CRC, another column's or file's
header, wrong length or dtype) is counted in `damaged` and recomputed, never used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable

import numpy as np

from dcslurm.core.storage import DataFolder, content_identity, sha256_file

# Bump a version when the code computing that column changes: its cached values are then stale.
VERSIONS = {"chars": 1, "words": 1, "fttokens": 1, "fasttext_en": 1, "gcld3_en": 1, "wordnet_entity": 1,
            "cluster": 1}
UNKNOWN = -1
OFF = "off"  # `derived_cache = "off"`: computed per file in memory only, nothing stored


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_id(folder: DataFolder, name: str) -> str:
    """The identity of one stored file's content, without reading it: its URL and
    `content_identity` (size; local mtime and inode, or the S3 ETag)."""
    return _digest(folder.url_of(name), content_identity(folder.info(name)))


@functools.lru_cache(maxsize=16)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)[:24]


def content_id(path: str) -> str:
    """sha256 of a local file (a model, a list), once per process per (path, size, mtime)."""
    st = os.stat(path)
    return _content_hash(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def folder_id(path: str) -> str:
    """sha256 over the files of a folder (a WordNet database), by name and content."""
    return _digest(sorted((n, content_id(os.path.join(path, n))) for n in os.listdir(path)
                          if os.path.isfile(os.path.join(path, n))))


def array_id(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return _digest(str(arr.dtype), arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())


class Store:
    """Where derived columns live (a folder URL), or nothing (`url` empty or "off")."""

    def __init__(self, url: str = "", storage_options: dict | None = None):
        self.folder = DataFolder(url, storage_options) if url and url != OFF else None

    def read(self, rel: str, column: str, fid: str, rows: int, dtype) -> tuple[np.ndarray | None, bool]:
        """(values, damaged): the stored column, or None (absent, or damaged: then True)."""
        if self.folder is None:
            return None, False
        try:
            data = self.folder.read_bytes(rel)
        except FileNotFoundError:
            return None, False
        try:
            # zipfile checks each member's CRC when it is read to its end: a flipped byte fails here
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                values = z["values"]
        except Exception:  # noqa: BLE001 - any unreadable file is damaged, whatever the cause
            return None, True
        if (meta != {"column": column, "file": fid, "rows": rows} or values.shape != (rows,)
                or values.dtype != np.dtype(dtype)):
            return None, True
        return values, False

    def write(self, rel: str, column: str, fid: str, values: np.ndarray) -> None:
        buf = io.BytesIO()
        meta = json.dumps({"column": column, "file": fid, "rows": len(values)}).encode()
        np.savez(buf, values=values, meta=np.frombuffer(meta, np.uint8))
        self.folder.write_bytes(rel, buf.getvalue())


class Column:
    """One derived column of one file: values known so far, -1 where not computed."""

    def __init__(self, store: Store, rel: str, column: str, fid: str, rows: int, dtype, stats: dict):
        self.store, self.rel, self.column, self.fid, self.dtype = store, rel, column, fid, np.dtype(dtype)
        values, damaged = store.read(rel, column, fid, rows, self.dtype)
        stats["damaged"] += int(damaged)
        self.values = values.copy() if values is not None else np.full(rows, UNKNOWN, self.dtype)
        self.dirty = False

    def get(self, idx: np.ndarray, compute: Callable[[np.ndarray], np.ndarray], stats: dict) -> np.ndarray:
        """The values at rows `idx`, computing (and keeping) those still unknown."""
        have = self.values[idx]
        missing = idx[have == UNKNOWN]
        if missing.size:
            self.values[missing] = np.asarray(compute(missing)).astype(self.dtype)
            self.dirty = True
        stats["reused"] += int(idx.size - missing.size)
        stats["computed"] += int(missing.size)
        return self.values[idx]

    def flush(self) -> None:
        if not self.dirty or self.store.folder is None:
            return
        # what another filter stored since we read it: its rows are as good as ours
        theirs, _ = self.store.read(self.rel, self.column, self.fid, len(self.values), self.dtype)
        if theirs is not None:
            take = (self.values == UNKNOWN) & (theirs != UNKNOWN)
            self.values[take] = theirs[take]
        self.store.write(self.rel, self.column, self.fid, self.values)
        self.dirty = False


class RowFeatures:
    """The derived values of one metadata file's rows, by row index, through the store.

    `texts(idx)` gives captions ('' for null) and `embeddings(key, idx)` npz rows; each feature
    is computed only for the rows asked and not known yet."""

    def __init__(self, store: Store, fid: Callable[[], str], rows: int, texts: Callable[[np.ndarray], list[str]],
                 embeddings: Callable[[str, np.ndarray], np.ndarray], npz_fid: Callable[[], str],
                 lid_model: str = ""):
        self.store, self._fid, self.rows = store, fid, rows
        self.lid_model = lid_model  # for terms that name none: the run's (FilterParams.lid_model)
        self.texts, self.embeddings, self._npz_fid = texts, embeddings, npz_fid
        self.stats = {"reused": 0, "computed": 0, "damaged": 0}
        self._columns: dict[str, Column] = {}
        self._fid_value: str | None = None

    def _column(self, name: str, identity: tuple, dtype, idx: np.ndarray, compute) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        column = _digest(name, VERSIONS[name], identity)
        if column not in self._columns:
            if self._fid_value is None:  # one stat (an S3 HEAD) per file, not per column
                self._fid_value = self._fid() if self.store.folder is not None else ""
            fid = self._fid_value
            self._columns[column] = Column(self.store, f"{fid}/{name}-{column}.npz", column, fid, self.rows,
                                           dtype, self.stats)
        return self._columns[column].get(idx, compute, self.stats)

    def flush(self) -> dict:
        for c in self._columns.values():
            c.flush()
        return dict(self.stats)

    # -- the features ----------------------------------------------------------
    def chars(self, idx: np.ndarray) -> np.ndarray:
        from jobs.filter.rules import char_counts

        return self._column("chars", (), np.int32, idx, lambda m: char_counts(self.texts(m)))

    def words(self, idx: np.ndarray) -> np.ndarray:
        from jobs.filter.rules import word_counts

        return self._column("words", (), np.int32, idx, lambda m: word_counts(self.texts(m)))

    def fasttext_tokens(self, idx: np.ndarray) -> np.ndarray:
        from jobs.filter.rules import fasttext_token_counts

        return self._column("fttokens", (), np.int32, idx, lambda m: fasttext_token_counts(self.texts(m)))

    def fasttext_en(self, idx: np.ndarray, lid_model: str) -> np.ndarray:
        from jobs.filter.rules import fasttext_english, fasttext_model_path

        lid_model = lid_model or self.lid_model
        model = content_id(fasttext_model_path(lid_model))
        return self._column("fasttext_en", (model,), np.int8, idx,
                            lambda m: fasttext_english(self.texts(m), lid_model)) == 1

    def gcld3_en(self, idx: np.ndarray) -> np.ndarray:
        from importlib.metadata import version

        from jobs.filter.rules import GCLD3_BYTES, gcld3_english

        return self._column("gcld3_en", (version("cld3-py"), GCLD3_BYTES), np.int8, idx,
                            lambda m: gcld3_english(self.texts(m))) == 1

    def wordnet_entity(self, idx: np.ndarray, synsets: str, wordnet: str) -> np.ndarray:
        from jobs.filter.rules import has_listed_entity, read_synset_ids, wordnet_db_dir

        ids = read_synset_ids(synsets)  # a missing list is a one-line error here
        identity = (content_id(synsets), folder_id(wordnet_db_dir(wordnet)))
        return self._column("wordnet_entity", identity, np.int8, idx,
                            lambda m: has_listed_entity(self.texts(m), ids, wordnet)) == 1

    def cluster(self, idx: np.ndarray, centroids: np.ndarray, centroids_id: str, key: str) -> np.ndarray:
        """Nearest centroid ids; `centroids_id`: array_id(centroids), hashed once by the caller."""
        from jobs.filter.rules import nearest_centroid

        identity = (centroids_id, key, self._npz_fid() if self.store.folder is not None else "")
        return self._column("cluster", identity, np.int32, idx,
                            lambda m: nearest_centroid(self.embeddings(key, m), centroids))
