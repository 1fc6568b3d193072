"""DataComp's own environment, for the benchmarks that run DataComp's programs side by side
with ours (bench_filter: baselines.py; bench_reshard: resharder.py).

A virtualenv with DataComp's pins, not ours (reference/README.md, reference/requirements.txt),
built on first use under DATACOMP_VENV (default .venv-datacomp); each program's extra
packages are added the first time that program is benchmarked.
"""

from __future__ import annotations

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get("DATACOMP_REFERENCE", os.path.join(os.path.dirname(ROOT), "shared", "datacomp", "reference"))
DATACOMP_VENV = os.environ.get("DATACOMP_VENV", os.path.join(ROOT, ".venv-datacomp"))
# What baselines.py imports. gcld3 3.0.13 needs protoc to build; cld3-py ships the same CLD3
# under the import name gcld3 (laion2b alone uses it, and it is not benchmarked here).
DATACOMP_PACKAGES = ["numpy==1.23.4", "pandas==1.5.1", "pyarrow==10.0.1", "torch==2.13.0+cpu", "nltk==3.8.1",
                     "webdataset==0.2.31", "faiss-cpu<1.8", "tqdm", "fsspec", "cld3-py", "pybind11==2.10.1",
                     "setuptools", "wheel"]
# What resharder.py imports besides (img2dataset only for --apply-blur: bench_reshard stands it in).
# opencv as requirements.txt pins it; pysimdjson 5.0.2 and cloudpathlib 0.13.0 have no wheels for
# this python, so later ones are taken (resharder.py reads each shard's json through simdjson).
RESHARDER_PACKAGES = ["opencv-python-headless==4.6.0.66", "pysimdjson==7.0.2", "cloudpathlib==0.26.0"]


def datacomp_python(extras: tuple[str, ...] | list[str] = (), extras_name: str = "") -> str:
    """The virtualenv's python, built the first time (a few minutes: fastText compiles from
    source); `extras` (named `extras_name`) installed into it once."""
    python = os.path.join(DATACOMP_VENV, "bin", "python")
    ready = os.path.join(DATACOMP_VENV, ".bench-ready")
    if not os.path.exists(ready):
        print(f"building DataComp's environment in {DATACOMP_VENV} (once; set DATACOMP_VENV to put it elsewhere)",
              flush=True)
        base = shutil.which("python3.11")
        if base is None:
            raise SystemExit("DataComp's environment needs python3.11 on PATH")
        _steps([[base, "-m", "venv", DATACOMP_VENV],
                [python, "-m", "pip", "install", "-q", *DATACOMP_PACKAGES],
                # fastText 0.9.2 builds against the pybind11 above (2.10, as DataComp's requirements pin)
                [python, "-m", "pip", "install", "-q", "--no-build-isolation", "fasttext==0.9.2"]])
        open(ready, "w").close()
    if extras:
        stamp = os.path.join(DATACOMP_VENV, f".bench-ready-{extras_name}")
        if not os.path.exists(stamp):
            print(f"adding {extras_name}'s packages to {DATACOMP_VENV}: {' '.join(extras)}", flush=True)
            # the base pins as constraints: an extra must not move numpy & co. under baselines.py
            constraints = os.path.join(DATACOMP_VENV, "constraints.txt")
            with open(constraints, "w") as f:
                f.write("\n".join(p for p in DATACOMP_PACKAGES if "==" in p) + "\n")
            _steps([[python, "-m", "pip", "install", "-q", "-c", constraints, *extras]])
            open(stamp, "w").close()
    return python


def _steps(steps: list[list[str]]) -> None:
    for step in steps:
        if subprocess.run(step).returncode != 0:
            raise SystemExit(f"building DataComp's environment failed at: {' '.join(step)}")
