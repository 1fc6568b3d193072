"""The filter as map-reduce over metadata files (parquet + npz beside each).

    prepare (1 task)  pool centroids / target centroid ids for image_based
    map     (array)   per file: uids, row-local masks, the scores and MetaCLIP
                      matches global rules need, first-digit score
                      histograms -> _parts/ID.npz; the uids sorted -> _uids/ID.npy
                      (a uid twice in the file fails here)
    reduce  (1 task)  no uid in two files (a bounded-memory merge of the sorted
                      uids, dcslurm.datacomp.pool.find_duplicate: the subset would repeat
                      that sample); global parameters, term by term in spec order, streaming
                      the parts one file at a time: exact fraction thresholds
                      (select.py), MetaCLIP counts, VAS S, VAS-D rounds
    apply   (array)   per file: the final mask -> sorted uids _kept/ID.npy;
                      row-local terms in the last global one's group or
                      after it run here, on the rows still alive (language
                      ID after the CLIP threshold, not before; image_based's
                      cluster ids in `image_based & clip_score(fraction=)`
                      only over the threshold)
    write   (1 task)  merge into subset.npy (sorted, by uid-range partitions)
                      and stats.json

Every file is processed whole by one task and every random draw is a
function of (uid, seed), so the subset does not depend on the task count.
All paths are inside a work folder (RUN/filter/ in a run).
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from dcslurm.datacomp.pool import (
    REQUIRED_COLUMNS,
    UidRun,
    column_type_problem,
    find_duplicate,
    parse_uids,
    save_uid_run,
    sorted_uid_run,
    uid_run_reader,
)
from jobs.filter import derived, rules
from jobs.filter.filterspec import FilterSpec, Term, parse_spec
from jobs.filter.select import TopDigitHistogram, exact_descending_value, fraction_index, keep_at_threshold

SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}
SUBSET = "subset.npy"
STATS = "stats.json"
PARAMS = "_params/params.json"
PARTITION_BYTES = 16 << 20  # uids (16 bytes each) sorted in memory at once in `write`


@dataclass(frozen=True)
class InputFile:
    """One metadata parquet (its npz beside it); `pid` orders and names it whatever the task split."""

    pid: str
    url: str

    @property
    def npz_url(self) -> str:
        return self.url[: -len(".parquet")] + ".npz"


def _split(url: str) -> tuple[str, str]:
    parent, name = url.rstrip("/").rsplit("/", 1)
    return parent, name


class Reader:
    """Reads inputs (parquet columns, npz keys) with one-line errors naming file and column/key, and
    the derived columns stored for them (`derived_cache`: a folder URL; "" or "off": none);
    `lid_model`: the language-ID model of terms that name none (the run's FilterParams.lid_model)."""

    def __init__(self, storage_options: dict | None = None, derived_cache: str = "", lid_model: str = ""):
        self.storage_options = storage_options or {}
        self.derived = derived.Store(derived_cache, self.storage_options)
        self.lid_model = lid_model  # the language-ID model of terms that name none ("": this machine's default)

    def folder(self, url: str) -> DataFolder:
        return DataFolder(_split(url)[0], self.storage_options)

    def table(self, f: InputFile, columns: list[str]) -> tuple[dict, int]:
        """The columns (pyarrow ChunkedArrays) and the row count of one parquet."""
        import pyarrow.parquet as pq

        parent, name = _split(f.url)
        folder = DataFolder(parent, self.storage_options)
        try:
            with folder.open(name) as fh:
                pf = pq.ParquetFile(fh)
                have = set(pf.schema_arrow.names)
                for c in columns:
                    if c not in have:
                        raise UserError(f"{f.url}: missing column {c!r}")
                    # a binary `text` would read as bytes, judged as empty captions: refuse it
                    problem = (column_type_problem(folder, name, f.url, c, pf.schema_arrow.field(c).type)
                               if c in REQUIRED_COLUMNS else None)
                    if problem:
                        raise UserError(problem)
                table = pf.read(columns=columns)
                rows = pf.metadata.num_rows
        except FileNotFoundError:
            raise UserError(f"{f.url}: metadata file not found") from None
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt parquet is bad input
            raise UserError(f"{f.url}: cannot read parquet ({type(exc).__name__}: {exc})") from None
        return {c: table.column(c) for c in columns}, rows

    def embeddings(self, f: InputFile, key: str, rows: int, select: np.ndarray | None = None) -> np.ndarray:
        """One npz key of a file (`rows` rows expected), or only its rows in `select` (a boolean
        mask or sorted row indices), in order. Only that key's bytes are read, streamed a block at
        a time: an npz holds four embedding arrays, and a term needs one of them, often on a few rows."""
        parent, name = _split(f.npz_url)
        folder = DataFolder(parent, self.storage_options)
        try:
            fh = folder.open(name)
        except FileNotFoundError:
            raise UserError(f"{f.npz_url}: embeddings file not found (needed for key {key!r})") from None
        try:
            with fh, zipfile.ZipFile(fh) as zf:
                members = {(n[:-4] if n.endswith(".npy") else n): n for n in zf.namelist()}
                if key not in members:
                    raise UserError(f"{f.npz_url}: missing key {key!r} (has {', '.join(members)})")
                with zf.open(members[key]) as member:
                    return _read_npy_rows(member, f.npz_url, key, rows, select)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{f.npz_url}: cannot read npz ({type(exc).__name__})") from None


NPY_BLOCK_BYTES = 8 << 20  # read at once when only some rows of an npz key are wanted


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `fh`, which is left at its data."""
    version = np.lib.format.read_magic(fh)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"npy format version {version}")
    return read_header(fh)


def _read_npy_rows(fh, url: str, key: str, rows: int, select: np.ndarray | None) -> np.ndarray:
    """A 2-d .npy array from a stream (its shape checked against `rows` before any data is read),
    all of it or only the rows `select` names, reading NPY_BLOCK_BYTES at a time."""
    shape, fortran, dtype = _npy_header(fh)
    if len(shape) != 2 or shape[0] != rows:
        raise UserError(f"{url}: key {key!r} has shape {shape}, but its parquet has {rows} rows")
    if dtype.hasobject:
        raise ValueError("object arrays")
    row_bytes = dtype.itemsize * shape[1]

    def read_exactly(n: int) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise EOFError(f"{n - len(data)} bytes missing")
        return data

    if fortran:  # not what np.save writes for C-ordered arrays; read whole
        arr = np.frombuffer(read_exactly(rows * row_bytes), dtype).reshape(shape[::-1]).T
        return np.array(arr if select is None else arr[select])
    idx = None if select is None else np.nonzero(select)[0] if select.dtype == bool else np.asarray(select, np.int64)
    out = np.empty((rows if idx is None else len(idx), shape[1]), dtype)
    block = max(1, NPY_BLOCK_BYTES // max(row_bytes, 1))
    done = 0
    for start in range(0, rows, block):
        count = min(block, rows - start)
        # every block is read, the unselected ones too: the member's stream (maybe compressed) is sequential
        data = np.frombuffer(read_exactly(count * row_bytes), dtype).reshape(count, shape[1])
        if idx is None:
            out[start:start + count] = data
            continue
        end = done + int(np.searchsorted(idx[done:], start + count))
        if end > done:
            out[done:end] = data[idx[done:end] - start]
            done = end
    return out


def _floats(col, f: InputFile, name: str) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise UserError(f"{f.url}: column {name!r} has type {col.type}, expected numbers")
    chunks = [_float_chunk(c.cast(pa.float64())) for c in col.chunks]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float64)


def _float_chunk(chunk) -> np.ndarray:
    """A float64 arrow array as numpy, nulls as NaN, from its buffers: pyarrow's to_numpy (even
    zero-copy) and fill_null import pandas, a second or more of every task's start."""
    n, off = len(chunk), chunk.offset
    validity, values = chunk.buffers()[:2]
    out = np.frombuffer(values, np.float64, count=n, offset=off * 8).copy() if n else np.zeros(0, np.float64)
    if chunk.null_count:
        bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")[off:off + n]
        out[bits == 0] = np.nan
    return out


def score_column(term: Term) -> str:
    kw = term.kw
    return kw["score"] or SCORE_COLUMNS[kw["arch"]]


def needed_columns(terms: list[Term], uid: bool = True) -> list[str]:
    cols = {"uid"} if uid else set()
    for term in terms:
        if term.name in ("basic", "laion2b", "text_based", "image_based", "metaclip"):
            cols.add("text")
        if term.name == "basic":
            cols |= {"original_width", "original_height"}
        if term.name == "laion2b":
            cols.add(SCORE_COLUMNS["b32"])
        if term.name == "clip_score":
            cols.add(score_column(term))
    return sorted(cols)


def deferred_terms(spec: FilterSpec) -> set[int]:
    """Row-local terms in the last global term's group or after it: no reduce needs them (a
    global term's candidates are the rows of the groups before its own), so `apply` evaluates
    them on the rows still alive there, the global terms of their own group included (language
    ID only after the CLIP threshold; `image_based & clip_score(fraction=)`: cluster ids only of
    the rows over the threshold)."""
    last_global = max((g for _, g, term in spec.terms() if term.is_global), default=-1)
    return {t for t, g, term in spec.terms() if not term.is_global and g >= last_global}


# -- prepare ------------------------------------------------------------------

def prepare(spec: FilterSpec, inputs: list[InputFile], work: DataFolder, reader: Reader, seed: int) -> dict:
    """Centroids and target centroid ids of every image_based term -> _prepared/imageT.npz."""
    stats: dict = {}
    for t, _, term in spec.terms():
        if term.name != "image_based":
            continue
        kw = term.kw
        targets = rules.load_matrix(kw["targets"], "image_based targets")
        if kw["centroids"]:
            centroids = rules.load_matrix(kw["centroids"], "image_based centroids")
        else:
            centroids = _pool_kmeans(term, inputs, reader, seed)
        if centroids.shape[1] != targets.shape[1]:
            raise UserError(f"{kw['targets']}: targets have dimension {targets.shape[1]}, "
                            f"centroids {centroids.shape[1]}")
        target_ids = np.unique(rules.nearest_centroid(targets, centroids))
        buf = io.BytesIO()
        # the centroids' hash names their cluster-id column (derived.py): hashed once here, not per file
        np.savez(buf, centroids=centroids, target_ids=target_ids,
                 centroids_id=np.frombuffer(derived.array_id(centroids).encode(), np.uint8))
        work.write_bytes(f"_prepared/image{t}.npz", buf.getvalue())
        stats[f"image{t}"] = {"centroids": int(len(centroids)), "target_centroids": int(len(target_ids))}
    return stats


def _pool_kmeans(term: Term, inputs: list[InputFile], reader: Reader, seed: int) -> np.ndarray:
    """faiss k-means (niter from the spec, no sub-sampling inside faiss) over caption-filtered pool rows."""
    import faiss
    import pyarrow.parquet as pq

    kw = term.kw
    total = 0
    for f in inputs:
        with reader.folder(f.url).open(_split(f.url)[1]) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    rate = min(1.0, kw["max_points"] / max(total, 1))
    chunks = []
    for f in inputs:
        fc = FileColumns(f, reader, [], {}, columns=["uid", "text"])
        hi, lo = parse_uids(fc.cols["uid"], f.url)
        mask = rules.image_caption_mask(fc.feat, np.arange(fc.n), kw["lid_model"])
        fc.flush()  # the map's image_based terms read these caption columns again
        if rate < 1.0:
            mask &= rules.uniform_by_uid(hi, lo, seed, stream=7) < rate
        chunks.append(np.asarray(reader.embeddings(f, kw["key"], len(hi), mask), dtype=np.float32))
    x = np.ascontiguousarray(np.concatenate(chunks)) if chunks else np.zeros((0, 1), np.float32)
    if len(x) < kw["k"]:
        raise UserError(f"image_based(k={kw['k']}): only {len(x)} caption-filtered pool rows to cluster; lower k")
    km = faiss.Kmeans(x.shape[1], kw["k"], niter=kw["iterations"], seed=seed, max_points_per_centroid=10_000_000,
                      verbose=False)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


# -- map ----------------------------------------------------------------------

class FileColumns:
    """The columns of one file that some terms need, with caption access by row index, and the
    file's derived columns (`feat`: language ID, caption lengths, ... cached across filters)."""

    def __init__(self, f: InputFile, reader: Reader, terms: list[Term], stats: dict, uid: bool = True,
                 columns: list[str] | None = None):
        self.f, self.stats = f, stats
        self._texts: np.ndarray | None = None
        self.cols, self.n = reader.table(f, columns or needed_columns(terms, uid))
        if "text" in self.cols:  # null captions are judged as empty ones, and counted
            stats["null_text"] = int(self.cols["text"].null_count)
        parquet, npz = reader.folder(f.url), reader.folder(f.npz_url)
        self.feat = derived.RowFeatures(
            reader.derived, lambda: derived.file_id(parquet, _split(f.url)[1]), self.n, self.texts,
            lambda key, idx: reader.embeddings(f, key, self.n, idx),
            lambda: derived.file_id(npz, _split(f.npz_url)[1]), reader.lid_model)

    def flush(self) -> None:
        """Store what the derived columns gained; their counts go to the stats (`derived`)."""
        self.stats["derived"] = self.feat.flush()

    def texts(self, idx: np.ndarray) -> list[str]:
        """The captions of rows `idx` ('' for null), each made a Python string once per file: the
        derived columns ask for theirs one column at a time, often for the same rows."""
        import pyarrow as pa

        if self._texts is None:
            self._texts = np.full(self.n, None, object)
        idx = np.ascontiguousarray(idx, np.int64)
        new = idx[np.equal(self._texts[idx], None)]
        if len(new):
            # the indices wrapped as an arrow array by hand: pa.array(numpy) would import pandas (its shim's check)
            values = self.cols["text"].take(pa.Array.from_buffers(pa.int64(), len(new), [None, pa.py_buffer(new)])
                                            ).to_pylist()
            self._texts[new] = [v if isinstance(v, str) else "" for v in values]
        return self._texts[idx].tolist()

    def floats(self, name: str, idx: np.ndarray) -> np.ndarray:
        return _floats(self.cols[name], self.f, name)[idx]


def row_local_mask(t: int, term: Term, fc: FileColumns, rows: np.ndarray | None, work: DataFolder,
                   reader: Reader) -> np.ndarray:
    """A row-local term's keep mask, computed only on `rows` (all rows if None; the others are False)."""
    kw, n = term.kw, fc.n
    idx = np.arange(n) if rows is None else np.nonzero(rows)[0]
    mask = np.zeros(n, bool)
    if term.name == "no_filter":
        sub = np.ones(len(idx), bool)
    elif term.name == "basic":  # captions are looked at only for the rows whose image passes
        sub = rules.basic_image_mask(fc.floats("original_width", idx), fc.floats("original_height", idx))
        sub[sub] = rules.basic_caption_mask(fc.feat, idx[sub], kw["lid_model"])
    elif term.name == "laion2b":
        sub = rules.laion2b_mask(fc.feat, idx, fc.floats(SCORE_COLUMNS["b32"], idx))
    elif term.name == "text_based":
        sub = rules.text_entity_mask(fc.feat, idx, kw["synsets"], kw["wordnet"], kw["lid_model"])
    elif term.name == "image_based":
        with np.load(io.BytesIO(work.read_bytes(f"_prepared/image{t}.npz"))) as z:
            centroids, target_ids = z["centroids"], z["target_ids"]
            cid = bytes(z["centroids_id"]).decode() if "centroids_id" in z.files else derived.array_id(centroids)
        # cluster ids only of the rows given whose caption passes: their embeddings alone are read
        sub = rules.image_caption_mask(fc.feat, idx, kw["lid_model"])
        sub[sub] = np.isin(fc.feat.cluster(idx[sub], centroids, cid, kw["key"]), target_ids)
    elif term.name == "clip_score":
        sub = keep_at_threshold(fc.floats(score_column(term), idx), kw["threshold"])
    else:
        raise AssertionError(f"{term.name} is not row-local")
    mask[idx] = sub
    return mask


def map_file(spec: FilterSpec, f: InputFile, work: DataFolder, reader: Reader) -> dict:
    """Per-file work before the reduce -> _parts/PID.npz (uids, masks, scores, matches); returns stats."""
    deferred = deferred_terms(spec)
    terms = [(t, term) for t, _, term in spec.terms() if t not in deferred]
    stats: dict = {}
    fc = FileColumns(f, reader, [term for _, term in terms], stats)
    hi, lo = parse_uids(fc.cols["uid"], f.url)
    n = stats["rows"] = len(hi)
    # The map half of the uid uniqueness check: this file's uids sorted (a duplicate inside
    # the file fails here, naming both rows) for the reduce to merge (`_unique_rows`).
    run, offsets = sorted_uid_run(hi, lo, f.url)
    save_uid_run(work, f"_uids/{f.pid}.npy", run)
    del run
    out: dict[str, np.ndarray] = {"hi": hi, "lo": lo, "uo": offsets}
    first_global = min((g for _, g, term in spec.terms() if term.is_global), default=-1)
    group_of = {t: g for t, g, _ in spec.terms()}
    for t, term in terms:
        kw = term.kw
        if not term.is_global:
            out[f"m{t}"] = row_local_mask(t, term, fc, None, work, reader)
        elif term.name == "clip_score":
            out[f"s{t}"] = fc.floats(score_column(term), slice(None))
            if group_of[t] == first_global:
                # Its candidates are known here (row-local terms only before it): the reduce's first
                # histogram pass happens in the map, file by file.
                alive = np.ones(n, bool)
                for t2, term2 in terms:
                    if group_of[t2] < first_global:
                        alive &= out[f"m{t2}"]
                hist = TopDigitHistogram()
                hist.add(out[f"s{t}"][alive])
                out[f"h{t}"] = hist.sparse()
        elif term.name == "metaclip":
            out[f"p{t}"], out[f"e{t}"] = rules.metaclip_matches(fc.texts(np.arange(n)), kw["entries"])
        elif term.name in ("vas", "vas_d"):
            # a bad npz fails here, in the map, naming the file (read through, no row kept)
            reader.embeddings(f, kw["key"], n, np.zeros(0, np.int64))
    fc.flush()
    buf = io.BytesIO()
    np.savez(buf, **out)
    work.write_bytes(f"_parts/{f.pid}.npz", buf.getvalue())
    return stats


class Parts(Mapping):
    """One map file's arrays (_parts/PID.npz), each decoded the first time it is asked for:
    the reduce and apply steps need a few of the keys each, and reading every array of every
    file at each of their passes was a tenth of a filter's time."""

    def __init__(self, data: bytes):
        self._npz = np.load(io.BytesIO(data))
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            if key not in self._npz.files:
                raise KeyError(key)
            self._arrays[key] = self._npz[key]
        return self._arrays[key]

    def __contains__(self, key: object) -> bool:
        return key in self._npz.files

    def __iter__(self) -> Iterator[str]:
        return iter(self._npz.files)

    def __len__(self) -> int:
        return len(self._npz.files)


def load_parts(work: DataFolder, pid: str) -> Parts:
    return Parts(work.read_bytes(f"_parts/{pid}.npz"))


# -- evaluation with fixed parameters ----------------------------------------

class Evaluator:
    """Term masks of one file's parts, given the global parameters fixed so far."""

    def __init__(self, spec: FilterSpec, work: DataFolder, reader: Reader, params: dict, seed: int):
        self.spec, self.work, self.reader, self.params, self.seed = spec, work, reader, params, seed
        self._cache: dict[str, np.ndarray] = {}

    def _array(self, rel: str) -> np.ndarray:
        if rel not in self._cache:
            self._cache[rel] = np.load(io.BytesIO(self.work.read_bytes(rel)))
        return self._cache[rel]

    def term_mask(self, t: int, term: Term, parts: dict, f: InputFile) -> np.ndarray:
        if f"m{t}" in parts:
            return parts[f"m{t}"]
        p = self.params[str(t)]
        if term.name == "clip_score":
            if "cut_value" in p:  # the CLIP step of a VAS pipeline: exactly n rows
                return _cut_mask(parts[f"s{t}"], parts["hi"], parts["lo"], p)
            return keep_at_threshold(parts[f"s{t}"], p["threshold"])
        if term.name == "metaclip":
            counts = self._array(f"_params/metaclip{t}.npy")
            prob = rules.metaclip_keep_probability(parts[f"p{t}"], parts[f"e{t}"], counts, term.kw["t"])
            return rules.uniform_by_uid(parts["hi"], parts["lo"], self.seed, stream=t) < prob
        if term.name == "vas":
            return np.load(io.BytesIO(self.work.read_bytes(f"_params/vas{t}/{f.pid}.npy")))
        if term.name == "vas_d":
            return np.load(io.BytesIO(self.work.read_bytes(f"_params/vasd{t}/{f.pid}.npy")))
        raise AssertionError(term.name)

    def alive(self, parts: dict, f: InputFile, before_group: int) -> np.ndarray:
        """Rows every group before `before_group` keeps."""
        mask = np.ones(len(parts["hi"]), bool)
        for t, g, term in self.spec.terms():
            if g < before_group:
                mask &= self.term_mask(t, term, parts, f)
        return mask


# -- reduce -------------------------------------------------------------------

def reduce(spec: FilterSpec, inputs: list[InputFile], work: DataFolder, reader: Reader, seed: int,
           scratch: str, first_level_from_map: bool = True) -> dict:
    """Fix every global parameter in spec order; writes _params/ and returns params.json's content."""
    n_pool = _unique_rows(inputs, work)
    params: dict = {"n_pool": n_pool}
    ev = Evaluator(spec, work, reader, params, seed)

    def candidates(g: int) -> Iterator[tuple[InputFile, dict, np.ndarray]]:
        for f in inputs:
            parts = load_parts(work, f.pid)
            yield f, parts, ev.alive(parts, f, g)

    exact_clip = _vas_clip_steps(spec)
    for t, g, term in spec.terms():
        if not term.is_global:
            continue
        kw = term.kw
        if term.name == "clip_score" and t in exact_clip:
            params[str(t)] = {"filter": term.text(), "column": score_column(term), **_top_cut(
                fraction_index(n_pool, kw["fraction"]),
                lambda: ((p[f"s{t}"][a], p["hi"][a], p["lo"][a]) for _, p, a in candidates(g)))}
        elif term.name == "clip_score":
            n = fraction_index(n_pool, kw["fraction"])
            first = None
            if first_level_from_map:
                first = TopDigitHistogram()
                for f in inputs:
                    packed = load_parts(work, f.pid).get(f"h{t}")
                    if packed is None:
                        first = None
                        break
                    first.merge_sparse(packed)
            thr, info = exact_descending_value(lambda: (p[f"s{t}"][a] for _, p, a in candidates(g)), n,
                                               first=first)
            params[str(t)] = {"filter": term.text(), "threshold": thr, "column": score_column(term), **info}
        elif term.name == "metaclip":
            counts = np.zeros(len(rules.read_entries(kw["entries"])), np.int64)
            for _, p, a in candidates(g):
                ptr, ids = p[f"p{t}"], p[f"e{t}"]
                row_of = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))  # the row of each match
                counts += np.bincount(ids[a[row_of]], minlength=len(counts))
            _save_npy(work, f"_params/metaclip{t}.npy", counts.astype(np.int64))
            params[str(t)] = {"filter": term.text(), "t": kw["t"], "entries_matched": int((counts > 0).sum()),
                              "entries_over_t": int((counts > kw["t"]).sum())}
        elif term.name in ("vas", "vas_d"):
            params[str(t)] = _vas_family(t, term, inputs, work, reader, candidates(_s_group(spec, g)),
                                         candidates(g), n_pool, scratch)
    work.write_json(PARAMS, params)
    return params


def _unique_rows(inputs: list[InputFile], work: DataFolder) -> int:
    """The pool's rows, after checking that no uid is in two files (the map checked inside each):
    a bounded-memory merge of the map's sorted runs (dcslurm.datacomp.pool.find_duplicate). A duplicate
    is one UserError naming both files and rows: the subset would repeat that sample."""
    runs, n_pool = [], 0
    for f in inputs:
        parts = load_parts(work, f.pid)
        if "uo" not in parts:
            raise UserError(f"{work.url_of(f'_parts/{f.pid}.npz')}: written by an older dcslurm (no sorted uids); "
                            f"delete {work.url} and run the filter again")
        offsets = parts["uo"]
        n_pool += int(offsets[-1])
        runs.append(UidRun(offsets, uid_run_reader(work, f"_uids/{f.pid}.npy"),
                           functools.partial(_halves, work, f.pid)))
    dup = find_duplicate(runs)
    if dup is not None:
        uid, i, ri, j, rj = dup
        raise UserError(f"{inputs[j].url}: duplicate uid {uid} in row {rj} (also in {inputs[i].url} row {ri})")
    return n_pool


def _halves(work: DataFolder, pid: str) -> tuple[np.ndarray, np.ndarray]:
    parts = load_parts(work, pid)
    return parts["hi"], parts["lo"]


def _save_npy(work: DataFolder, rel: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    work.write_bytes(rel, buf.getvalue())


# -- VAS and VAS-D, as the authors' code selects (github ypwang61/VAS, baselines/vas.py) --------------
#
# Their VAS and VAS-D functions take the CLIP-score step themselves: S (VAS's target=pool,
# VAS-D's first round) is built from every row handed to them, BEFORE that step; the CLIP
# step and the VAS step each keep exactly n = int(N * fraction) rows (np.argpartition,
# torch.topk); VAS-D removes a fixed ceil((n0 - n) / k) rows a round. A `clip_score` group
# right before a vas/vas_d term is read as that step.

def _vas_clip_step(spec: FilterSpec, g: int) -> int | None:
    """The term index of the CLIP step of a VAS-family term in group g: group g-1 if it is one clip_score."""
    if g == 0 or len(spec.groups[g - 1]) != 1 or spec.groups[g - 1][0].name != "clip_score":
        return None
    return next(t for t, g2, _ in spec.terms() if g2 == g - 1)


def _vas_clip_steps(spec: FilterSpec) -> set[int]:
    """clip_score(fraction=) terms that are a VAS pipeline's CLIP step, so keep exactly n rows."""
    steps = {_vas_clip_step(spec, g) for _, g, term in spec.terms() if term.name in ("vas", "vas_d")}
    return {t for t, _, term in spec.terms() if t in steps and term.is_global}


def _s_group(spec: FilterSpec, g: int) -> int:
    """Whose rows build S for a VAS-family term in group g: those entering its CLIP step, else its candidates."""
    return g - 1 if _vas_clip_step(spec, g) is not None else g


def _nan_last(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)


def _top_cut(n: int, stream, scores_only=None) -> dict:
    """Where exactly the top n of the streamed candidates end: score descending, NaN last, then uid ascending.

    `stream()` yields (scores, hi, lo) of one file's candidates and is called once per pass;
    `scores_only()`, if given, yields the same scores without the uids, for the passes that
    need no uids (the uids come from the work folder, the scores may be local).
    The authors keep exactly n too, but which rows tied at the cut they keep depends on the
    order their worker processes hand back the files (argpartition/topk over one array);
    here ties go to the smaller uid, the same on any task split. (Their argpartition also
    ranks NaN first; NaN ranks last here, as in DataComp's sort.) Keep score > cut_value,
    or score == cut_value and uid <= cut_uid; kept = 0 keeps nothing.
    """
    if n <= 0:
        return {"kept": 0, "cut_value": float("inf"), "cut_uid": [0, 0]}
    scores_only = scores_only or (lambda: (sc for sc, _, _ in stream()))
    v, info = exact_descending_value(lambda: (_nan_last(sc) for sc in scores_only()), n - 1)
    if n > info["candidates"]:  # fewer candidates than n: all of them
        return {"kept": info["candidates"], "cut_value": float("-inf"), "cut_uid": [(1 << 64) - 1] * 2}
    above = sum(int((_nan_last(sc) > v).sum()) for sc in scores_only())
    ties = [rules.uid_array(hi[_nan_last(sc) == v], lo[_nan_last(sc) == v]) for sc, hi, lo in stream()]
    cut = rules.sort_uids(np.concatenate(ties))[n - above - 1]
    return {"kept": n, "cut_value": v, "cut_uid": [int(cut["f0"]), int(cut["f1"])]}


def _cut_mask(scores: np.ndarray, hi: np.ndarray, lo: np.ndarray, cut: dict) -> np.ndarray:
    """Rows at or above a `_top_cut` (on every row given; the caller ands its candidates)."""
    if not cut["kept"]:
        return np.zeros(len(scores), bool)
    sc, v = _nan_last(scores), cut["cut_value"]
    c_hi, c_lo = np.uint64(cut["cut_uid"][0]), np.uint64(cut["cut_uid"][1])
    return (sc > v) | ((sc == v) & ((hi < c_hi) | ((hi == c_hi) & (lo <= c_lo))))


def _second_moment(rows: Iterator[np.ndarray]) -> tuple[np.ndarray, int]:
    """(1/N) sum f f^T over the L2-normalised rows, and N."""
    s, n = None, 0
    for f in rows:
        f = rules.normalized(f)
        s = f.T @ f if s is None else s + f.T @ f
        n += len(f)
    if s is None or n == 0:
        raise UserError("vas: no candidate rows to build the target second moment from")
    return s / n, n


def _vas_target(term: Term, s_rows, reader: Reader) -> tuple[np.ndarray, int | None]:
    """S and the rows it was built from (None: S given as a file)."""
    kw = term.kw
    if kw["target"] == "pool":
        return _second_moment(reader.embeddings(f, kw["key"], len(p["hi"]), a) for f, p, a in s_rows)
    m = rules.load_matrix(kw["target"], "vas target")
    if m.shape[0] == m.shape[1] and np.allclose(m, m.T):
        return m.astype(np.float64), None  # already S
    return _second_moment(iter([m]))


def _vas_family(t: int, term: Term, inputs: list[InputFile], work: DataFolder, reader: Reader, s_rows, cands,
                n_pool: int, scratch: str) -> dict:
    """VAS (one round with S from the target) or VAS-D (`iterations` rounds, S recomputed from the survivors
    after the first) over the candidates; the last round keeps exactly n = int(N_pool * fraction).
    `s_rows` yields the rows S starts from. Writes the kept rows of each file to _params/."""
    kw = term.kw
    alive_dir = os.path.join(scratch, f"vas{t}")
    os.makedirs(alive_dir, exist_ok=True)
    n0 = 0
    for f, _, a in cands:
        np.save(os.path.join(alive_dir, f"{f.pid}.npy"), a)
        n0 += int(a.sum())
    n = min(fraction_index(n_pool, kw["fraction"]), n0)
    info: dict = {"filter": term.text(), "candidates": n0}
    if term.name == "vas":
        sizes = [n]
        s, info["s_rows"] = _vas_target(term, s_rows, reader)
        _save_npy(work, f"_params/vas{t}.npy", s)
        info["target"] = kw["target"]
    else:
        info["target"] = n
        sizes = rules.vas_d_sizes(n0, n, kw["iterations"])
        info.update(iterations=kw["iterations"], rounds=len(sizes), chunk=-(-(n0 - n) // kw["iterations"]),
                    first_sizes=sizes[:3], last_size=sizes[-1] if sizes else n0, kept=sizes[-1] if sizes else n0)
        if sizes:
            s, info["s_rows"] = _second_moment(reader.embeddings(f, kw["key"], len(p["hi"]), a) for f, p, a in s_rows)
    for i, size in enumerate(sizes):
        if i:
            s, _ = _second_moment(reader.embeddings(f, kw["key"], len(a), a)
                                  for f, a in _alive(inputs, alive_dir) if a.any())
        cut = _vas_round(s, size, inputs, work, reader, kw["key"], alive_dir)
    if term.name == "vas":
        info.update(cut)
    for f, a in _alive(inputs, alive_dir):
        _save_npy(work, f"_params/{'vas' if term.name == 'vas' else 'vasd'}{t}/{f.pid}.npy", a)
    return info


def _alive(inputs: list[InputFile], alive_dir: str) -> Iterator[tuple[InputFile, np.ndarray]]:
    for f in inputs:
        yield f, np.load(os.path.join(alive_dir, f"{f.pid}.npy"))


def _vas_round(s: np.ndarray, n: int, inputs: list[InputFile], work: DataFolder, reader: Reader, key: str,
               alive_dir: str) -> dict:
    """Keep exactly n of the rows alive in `alive_dir`, highest f^T S f first (`_top_cut`); returns the cut."""
    score_dir = alive_dir + ".scores"  # each file's scores once a round; the cut reads them a few times
    os.makedirs(score_dir, exist_ok=True)
    for f, a in _alive(inputs, alive_dir):
        sc = np.zeros(len(a))  # the rows not alive are never read: every use ands the alive mask
        if a.any():
            sc[a] = rules.vas_scores(reader.embeddings(f, key, len(a), a), s)
        np.save(os.path.join(score_dir, f"{f.pid}.npy"), sc)

    def files():
        for f, a in _alive(inputs, alive_dir):
            p = load_parts(work, f.pid)
            yield f, a, np.load(os.path.join(score_dir, f"{f.pid}.npy")), p["hi"], p["lo"]

    def scores_only():
        for f, a in _alive(inputs, alive_dir):
            yield np.load(os.path.join(score_dir, f"{f.pid}.npy"))[a]

    cut = _top_cut(n, lambda: ((sc[a], hi[a], lo[a]) for _, a, sc, hi, lo in files()), scores_only)
    for f, a, sc, hi, lo in files():  # one file at a time; its alive mask is read before it is rewritten
        np.save(os.path.join(alive_dir, f"{f.pid}.npy"), a & _cut_mask(sc, hi, lo, cut))
    return cut


# -- apply & write ------------------------------------------------------------

def apply_file(spec: FilterSpec, f: InputFile, work: DataFolder, reader: Reader, params: dict, seed: int) -> dict:
    """The final mask of one file -> sorted uids in _kept/PID.npy; returns per-term kept counts."""
    parts = load_parts(work, f.pid)
    ev = Evaluator(spec, work, reader, params, seed)
    n = len(parts["hi"])
    kept = np.ones(n, bool)
    counts: dict[str, int] = {}
    terms = spec.terms()
    deferred = deferred_terms(spec)
    read_stats: dict = {}
    fc = (FileColumns(f, reader, [term for t, _, term in terms if t in deferred], read_stats, uid=False)
          if deferred else None)
    if fc is not None and fc.n != n:
        raise UserError(f"{f.url}: has {fc.n} rows now but {n} when the map read it; was it rewritten mid-run?")
    for t, _, term in terms:  # spec order in stats.json
        counts[f"{t}:{term.text()}"] = 0
    for g in range(len(spec.groups)):
        candidates, group_keep = kept, np.ones(n, bool)
        group = [(t, term) for t, g2, term in terms if g2 == g]
        # The terms already decided (global ones, row-local ones of the map) first; a deferred term is
        # judged only on the candidates they keep, so its count is of those rows. Deferred terms do
        # not narrow each other: each one's count stays the count over its group's candidates.
        decided = candidates.copy()
        for t, term in group:
            if t not in deferred:
                m = ev.term_mask(t, term, parts, f)
                counts[f"{t}:{term.text()}"] = int((m & candidates).sum())
                decided &= m
        group_keep &= decided
        for t, term in group:
            if t in deferred:
                m = row_local_mask(t, term, fc, decided, work, reader)
                counts[f"{t}:{term.text()}"] = int((m & candidates).sum())
                group_keep &= m
        kept = candidates & group_keep
    if fc is not None:
        fc.flush()
    uids = rules.sort_uids(rules.uid_array(parts["hi"][kept], parts["lo"][kept]))
    _save_npy(work, f"_kept/{f.pid}.npy", uids)
    # null captions are counted where the text column is first read: here only if the map did not read it
    map_read_text = "text" in needed_columns([term for t, _, term in terms if t not in deferred])
    null_text = 0 if map_read_text else read_stats.get("null_text", 0)
    return {"rows": n, "kept": int(kept.sum()), "term_kept": counts, "null_text": null_text,
            "derived": read_stats.get("derived", {})}


def write_subset(inputs: list[InputFile], work: DataFolder, out: DataFolder, out_name: str = SUBSET,
                 partition_bytes: int = PARTITION_BYTES) -> int:
    """Merge every _kept/PID.npy into one sorted subset file, `partition_bytes` of uids sorted at a time."""
    sizes = {}
    for f in inputs:
        sizes[f.pid] = _npy_rows(work, f"_kept/{f.pid}.npy")
    total = sum(sizes.values())
    n_parts = max(1, -(-total * 16 // partition_bytes))
    bounds = [(i << 64) // n_parts for i in range(n_parts + 1)]  # uid ranges on the upper 64 bits
    dtype = np.dtype("u8,u8")
    with out.writer(out_name) as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": (total,)})
        written = 0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            chunk = []
            for f in inputs:
                if not sizes[f.pid]:
                    continue
                # One file's kept uids at a time (a file, not the pool: memory stays flat);
                # no memory map, whose touched pages would add up in the resident set.
                arr = np.load(io.BytesIO(work.read_bytes(f"_kept/{f.pid}.npy")))
                a = int(np.searchsorted(arr["f0"], np.uint64(lo)))
                b = len(arr) if hi == 1 << 64 else int(np.searchsorted(arr["f0"], np.uint64(hi)))
                chunk.append(arr[a:b].copy())
                del arr
            part = rules.sort_uids(np.concatenate(chunk)) if chunk else np.zeros(0, dtype)
            fh.write(part.tobytes())
            written += len(part)
    assert written == total, (written, total)
    return total


def _npy_rows(work: DataFolder, rel: str) -> int:
    with work.open(rel) as fh:
        shape, _, _ = _npy_header(fh)
    return int(shape[0])


def summary(spec: FilterSpec, apply_stats: list[dict], map_stats: list[dict], params: dict, seed: int) -> dict:
    """stats.json: input rows, kept rows, per-filter kept counts, thresholds used, seed."""
    term_kept: dict[str, int] = {}
    for s in apply_stats:
        for k, v in s["term_kept"].items():
            term_kept[k] = term_kept.get(k, 0) + v
    return {
        "spec": spec.text(), "seed": seed,
        "input_rows": sum(s["rows"] for s in apply_stats),
        "kept_rows": sum(s["kept"] for s in apply_stats),
        "per_filter_kept": term_kept,
        "null_text_rows": (sum(s.get("null_text", 0) for s in map_stats)
                           + sum(s.get("null_text", 0) for s in apply_stats)),
        "parameters": {k: v for k, v in params.items() if k != "n_pool"},
        # derived-column rows read from the cache / computed here; cache files found damaged (recomputed)
        "derived": add_counts(s.get("derived") or {} for s in [*map_stats, *apply_stats]),
    }


def add_counts(dicts) -> dict:
    """The sum of `derived` counters ({reused, computed, damaged})."""
    out = {"reused": 0, "computed": 0, "damaged": 0}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def json_safe(obj):
    """Floats NaN/inf as strings so stats.json stays valid JSON."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


# -- one machine --------------------------------------------------------------

def list_inputs(pool: str, storage_options: dict | None = None) -> list[InputFile]:
    folder = DataFolder(pool, storage_options)
    names = folder.list(suffix=".parquet")
    if not names:
        raise UserError(f"{folder.url}: no .parquet files")
    return [InputFile(f"{i:08d}", folder.url_of(n)) for i, n in enumerate(names)]


def _limit_blas_threads(threads: int) -> None:
    """A worker process's BLAS threads: its share of the machine's cores. Each forked worker's
    OpenBLAS otherwise starts a thread per core, and with every worker doing so the threads spin
    on each other's cores: image_based's centroid matmul cost a quarter more CPU time with 2 workers
    on 2 cores, for no gain in wall time. threadpoolctl comes with scikit-learn (the jobs extra);
    without it the workers run as they did."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


def _map_one(args):
    spec_text, f, work, options, cache = args
    return map_file(parse_spec(spec_text), f, work, Reader(options, cache))


def _apply_one(args):
    spec_text, f, work, options, cache, params, seed = args
    return apply_file(parse_spec(spec_text), f, work, Reader(options, cache), params, seed)


DERIVED = "_derived"  # the default derived-column folder, inside the filter's work folder


def run_local(spec_text: str, inputs: list[InputFile], work: DataFolder, out_url: str, seed: int = 0,
              scratch: str | None = None, storage_options: dict | None = None, workers: int = 1,
              derived_cache: str = "") -> dict:
    """The whole filter on this machine (what `dcslurm filter run` does); returns stats.json's content.

    `workers` > 1 runs the map and apply files in that many processes (the
    same per-file functions the array tasks run, so the subset is the same).
    `derived_cache`: the derived-column folder (derived.py); default WORK/_derived, "off" for none.
    """
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    try:
        spec = parse_spec(spec_text)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cache = derived_cache or work.url_of(DERIVED)
    reader = Reader(storage_options, cache)
    scratch = scratch or tempfile.mkdtemp(prefix="dcslurm-filter-")
    prepare(spec, inputs, work, reader, seed)
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        with ProcessPoolExecutor(workers, initializer=_limit_blas_threads, initargs=(share,)) as pool:
            map_stats = list(pool.map(_map_one, [(spec_text, f, work, storage_options, cache) for f in inputs]))
            params = reduce(spec, inputs, work, reader, seed, scratch)
            apply_stats = list(pool.map(_apply_one, [(spec_text, f, work, storage_options, cache, params, seed)
                                                     for f in inputs]))
    else:
        map_stats = [map_file(spec, f, work, reader) for f in inputs]
        params = reduce(spec, inputs, work, reader, seed, scratch)
        apply_stats = [apply_file(spec, f, work, reader, params, seed) for f in inputs]
    parent, name = out_url.rstrip("/").rsplit("/", 1) if "/" in out_url else (".", out_url)
    out = DataFolder(parent, storage_options)
    write_subset(inputs, work, out, name)
    stats = json_safe(summary(spec, apply_stats, map_stats, params, seed))
    out.write_json(posixpath.splitext(name)[0] + "_stats.json", stats)
    return stats
