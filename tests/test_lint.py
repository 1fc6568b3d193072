"""Lint in the default suite: ruff and the import contracts (pyproject's [tool.ruff] and [tool.importlinter])."""

import subprocess
import sys
import tomllib
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


def test_cli_contracts_name_every_cli_module():
    # import-linter's wildcards only match whole module names, so the contracts list dcslurm/*_cli.py by name.
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    clis = {f"dcslurm.{p.stem}" for p in (ROOT / "dcslurm").glob("*_cli.py")}
    for cid in ("jobs-below-cli", "executors-below-cli"):
        forbidden = next(c for c in contracts if c["id"] == cid)["forbidden_modules"]
        assert clis <= set(forbidden), f"{cid}: add {sorted(clis - set(forbidden))}"


def test_cli_and_stage_registry_load_without_torch():
    # What grimp cannot check (it sees function-level imports as imports, and not importlib's): the CLI
    # and every jobs/<pkg>/spec.py the registry loads import without torch & co.
    code = ("import sys, dcslurm.cli\n"
            "from dcslurm.stages import registry\n"
            "assert registry()\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = _run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
