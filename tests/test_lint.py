"""Lint in the default suite: ruff and the import contracts (pyproject's [tool.ruff] and [tool.importlinter])."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's ruff and lint-imports sit beside its python
HEAVY = ("torch", "torchvision", "open_clip", "faiss")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff():
    proc = _run(str(BIN / "ruff"), "check", "--no-cache", "dcslurm", "jobs", "tests", "benchmarks", "scripts")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_contracts():
    proc = _run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_and_stage_registry_load_without_torch():
    # What grimp cannot check (it sees function-level imports as imports, and not importlib's): the CLI
    # and every jobs/<pkg>/spec.py the registry loads import without torch & co.
    code = ("import sys, dcslurm.cli\n"
            "from dcslurm.core.stages import registry\n"
            "assert registry()\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = _run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
