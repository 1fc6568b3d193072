"""The one TOML writer: sweep files, the run.toml of each sweep piece, the demo's sweep
files, and the configs tests and benchmarks write. tomli-w does the quoting and escaping
(what tomllib reads back equals what was written); this module only adds a header comment
and the choice of a file or a folder's run.toml.
"""

from __future__ import annotations

import os

import tomli_w

from dcslurm.core.plan import RUN_TOML


def dumps(doc: dict, comment: str = "") -> str:
    """`doc` as a TOML document, after `comment` (lines, each written as `# line`)."""
    head = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    return head + tomli_w.dumps(doc)


def write_toml(path: str | os.PathLike, doc: dict, comment: str = "") -> str:
    """Write `doc` to `path` (a folder: its run.toml); returns the file's path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, RUN_TOML)
    with open(path, "w") as f:
        f.write(dumps(doc, comment))
    return path
