"""Who is in which group: the groups file (groups.toml) and the per-row group assignment.

A *dimension* is one way of splitting the pool (gender keywords, domain, caption
length, ...); a *group* is one value of it. Keyword dimensions let a row be in
several groups (or in "(none)"); every other dimension puts each row in exactly one.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from dcslurm.core.errors import UserError

DEFAULT_GROUPS = os.path.join(os.path.dirname(__file__), "groups.toml")
NONE = "(none)"
MISSING = "(missing)"
OTHER = "(other)"
GENERIC_TLD = "(generic)"
_NOT_WORD = re.compile(r"[^a-z0-9+'\-]+")
BUCKET_SOURCES = ("caption_words", "image_min_side", "aspect_ratio")
CATEGORICAL_SOURCES = ("domain", "country_tld", "language")


@dataclass
class GroupConfig:
    keywords: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # dimension -> group -> terms
    buckets: dict[str, list[float]] = field(default_factory=dict)  # dimension -> lower edges
    categorical: list[str] = field(default_factory=list)  # domain / country_tld / language / column names
    top: int = 25
    source: str = DEFAULT_GROUPS

    def dimensions(self) -> list[str]:
        return list(self.keywords) + list(self.buckets) + list(self.categorical)


def _words(text: str) -> str:
    """Lower-case words separated by single spaces, padded with a space on both sides."""
    return " " + " ".join(_NOT_WORD.split(text.lower())).strip() + " "


def load_groups(path: str = "", extra_columns: list[str] | tuple[str, ...] = (),
                text: str | None = None) -> GroupConfig:
    """Parse a groups file (default: jobs/audit/groups.toml); one-line UserError naming file and key."""
    path = path or DEFAULT_GROUPS
    try:
        if text is None:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        else:
            data = tomllib.loads(text)
    except FileNotFoundError:
        raise UserError(f"{path}: groups file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    cfg = GroupConfig(source=path)
    for dim, groups in data.get("keywords", {}).items():
        if not isinstance(groups, dict):
            raise UserError(f"{path}: [keywords.{dim}] must be a table of group = [terms]")
        cfg.keywords[dim] = {}
        for group, terms in groups.items():
            if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip() for t in terms):
                raise UserError(f"{path}: keywords.{dim}.{group}: expected a non-empty list of words")
            cfg.keywords[dim][group] = [t for t in terms]
    for dim, spec in data.get("buckets", {}).items():
        if dim not in BUCKET_SOURCES:
            raise UserError(f"{path}: buckets.{dim}: unknown (known: {', '.join(BUCKET_SOURCES)})")
        edges = spec.get("edges") if isinstance(spec, dict) else None
        if (not isinstance(edges, list) or not edges or not all(isinstance(e, (int, float)) for e in edges)
                or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise UserError(f"{path}: buckets.{dim}.edges: expected increasing numbers")
        cfg.buckets[dim] = [float(e) for e in edges]
    cat = data.get("categorical", {})
    cfg.top = int(cat.get("top", 25))
    if cfg.top < 1:
        raise UserError(f"{path}: categorical.top: must be >= 1")
    cfg.categorical = [name for name in CATEGORICAL_SOURCES if cat.get(name, False)]
    columns = cat.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise UserError(f"{path}: categorical.columns: expected a list of column names")
    for c in [*columns, *extra_columns]:
        if c not in cfg.categorical:
            cfg.categorical.append(c)
    return cfg


def columns_needed(cfg: GroupConfig) -> set[str]:
    """Metadata columns the groups read (besides uid)."""
    cols = set()
    if cfg.keywords or "caption_words" in cfg.buckets or "language" in cfg.categorical:
        cols.add("text")
    if "image_min_side" in cfg.buckets or "aspect_ratio" in cfg.buckets:
        cols |= {"original_width", "original_height"}
    if "domain" in cfg.categorical or "country_tld" in cfg.categorical:
        cols.add("url")
    cols |= {c for c in cfg.categorical if c not in CATEGORICAL_SOURCES}
    return cols


class KeywordMatcher:
    """Whole-word matching of every keyword term at once (Aho-Corasick over space-padded words)."""

    def __init__(self, keywords: dict[str, dict[str, list[str]]]):
        import ahocorasick

        self.dims = list(keywords)
        self.automaton = ahocorasick.Automaton()
        targets: dict[str, set] = {}
        for dim, groups in keywords.items():
            for group, terms in groups.items():
                for term in terms:
                    targets.setdefault(_words(term), set()).add((dim, group))
        for key, value in targets.items():
            self.automaton.add_word(key, sorted(value))
        if targets:
            self.automaton.make_automaton()
        self.empty = not targets

    def groups(self, text: str) -> dict[str, set[str]]:
        """dimension -> the groups whose terms occur in `text` (missing dimension = none)."""
        found: dict[str, set[str]] = {}
        if self.empty:
            return found
        for _, hits in self.automaton.iter(_words(text)):
            for dim, group in hits:
                found.setdefault(dim, set()).add(group)
        return found


def bucket_labels(edges: list[float]) -> list[str]:
    def fmt(x: float) -> str:
        return f"{x:g}"

    return [f"[{fmt(a)}, {fmt(b)})" for a, b in zip(edges, edges[1:])] + [f">= {fmt(edges[-1])}"]


def bucketize(values: np.ndarray, edges: list[float]) -> list[str]:
    labels = bucket_labels(edges)
    idx = np.clip(np.searchsorted(np.asarray(edges), values, side="right") - 1, 0, len(edges) - 1)
    return [MISSING if not np.isfinite(v) else labels[i] for v, i in zip(values, idx)]


def url_domain(url) -> str:
    if not isinstance(url, str) or not url:
        return MISSING
    try:
        host = urllib.parse.urlsplit(url if "//" in url else "//" + url).hostname or ""
    except ValueError:
        return MISSING
    host = host.rstrip(".")
    if not host or any(c.isspace() for c in host):
        return MISSING  # not a URL
    return host[4:] if host.startswith("www.") else host


def country_tld(domain: str) -> str:
    if domain == MISSING:
        return MISSING
    last = domain.rsplit(".", 1)[-1]
    if last.isdigit():
        return MISSING  # an IP address: no TLD
    return f".{last}" if len(last) == 2 and last.isalpha() else GENERIC_TLD


@functools.lru_cache(maxsize=1)
def _lid_predict():
    from jobs.filter.rules import fasttext_model

    return fasttext_model().f.predict  # loaded once per process, not once per file


def languages(texts: list[str]) -> list[str]:
    """fastText lid.176 top-1 language code per caption ("(missing)" for empty captions)."""
    predict = _lid_predict()
    out = []
    for t in texts:
        if not t.strip():
            out.append(MISSING)
            continue
        top = predict(t.replace("\n", " ") + "\n", 1, 0.0, "strict")
        out.append(top[0][1].removeprefix("__label__") if top else MISSING)
    return out


def row_groups(cfg: GroupConfig, cols: dict[str, list], n: int, url: str = "") -> dict[str, list]:
    """dimension -> per row: a group name (single-valued dimensions) or a set of groups (keywords)."""
    texts = [t if isinstance(t, str) else "" for t in cols.get("text", [""] * n)]
    out: dict[str, list] = {}
    if cfg.keywords:
        matcher = KeywordMatcher(cfg.keywords)
        found = [matcher.groups(t) for t in texts]
        for dim in cfg.keywords:
            out[dim] = [f.get(dim) or {NONE} for f in found]
    for dim, edges in cfg.buckets.items():
        if dim == "caption_words":
            values = np.array([len(t.split()) for t in texts], np.float64)
            values[[not isinstance(t, str) for t in cols["text"]]] = np.nan  # null caption: missing
        else:
            w = np.array([np.nan if v is None else v for v in cols["original_width"]], np.float64)
            h = np.array([np.nan if v is None else v for v in cols["original_height"]], np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.minimum(w, h) if dim == "image_min_side" else np.where(h > 0, w / h, np.nan)
        out[dim] = bucketize(values, edges)
    domains = [url_domain(u) for u in cols["url"]] if "url" in cols else None
    for dim in cfg.categorical:
        if dim == "domain":
            out[dim] = domains
        elif dim == "country_tld":
            out[dim] = [country_tld(d) for d in domains]
        elif dim == "language":
            out[dim] = languages(texts)
        else:
            out[dim] = [MISSING if v is None else str(v) for v in cols[dim]]
    return out


def count_groups(groups: dict[str, list], kept: np.ndarray) -> dict[str, dict[str, list[int]]]:
    """dimension -> group -> [raw rows, kept rows]."""
    out: dict[str, dict[str, list[int]]] = {}
    for dim, per_row in groups.items():
        raw, keep = Counter(), Counter()
        for g, k in zip(per_row, kept):
            for name in (g if isinstance(g, set) else (g,)):
                raw[name] += 1
                keep[name] += int(k)
        out[dim] = {name: [raw[name], keep[name]] for name in sorted(raw)}
    return out
