"""sbatch/examples/ is what `dcslurm render` writes for sbatch/examples/run.toml today.

The examples are documentation people copy from: when the rendering changes (a new
#SBATCH line, a storage option), this test fails until they are rendered again with
`python -m tests.test_sbatch_examples` (which rewrites them), so they never go stale.
"""

from __future__ import annotations

import os
import sys

from dcslurm.cli.render import render_run

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sbatch", "examples")
CONFIG = os.path.join(EXAMPLES, "run.toml")


def render(out: str) -> dict[str, str]:
    # No checks: the example's storage (s3.example.org) and folders (/shared/...) are another
    # cluster's; rendering must neither reach them nor make anything but the scripts.
    names = render_run(CONFIG, out, checks=False)
    texts = {}
    for name in names:
        with open(os.path.join(out, name)) as f:
            texts[name] = f.read()
    return texts


def test_rendered_examples_match_the_files_in_sbatch_examples(tmp_path):
    rendered = render(str(tmp_path / "out"))
    on_disk = sorted(n for n in os.listdir(EXAMPLES) if n != "run.toml")
    assert sorted(rendered) == on_disk, "render them again: python -m tests.test_sbatch_examples"
    for name, text in rendered.items():
        with open(os.path.join(EXAMPLES, name)) as f:
            assert f.read() == text, f"sbatch/examples/{name} is stale: python -m tests.test_sbatch_examples"


def test_rendering_makes_nothing_outside_its_output_folder(tmp_path):
    log_root = "/shared/dcslurm/logs/small-baseline"  # [executor] log_dir of the example
    existed = os.path.exists("/shared")
    render(str(tmp_path / "out"))
    assert existed or not os.path.exists("/shared"), "render made the example's log folders on this machine"
    with open(tmp_path / "out" / "submit.sh") as f:
        script = f.read()
    assert f"mkdir -p {log_root}/train" in script  # submit.sh makes them where the jobs will run


if __name__ == "__main__":  # rewrite sbatch/examples/ from run.toml
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for old in os.listdir(EXAMPLES):
            if old != "run.toml":
                os.unlink(os.path.join(EXAMPLES, old))
        for name, text in render(tmp).items():
            with open(os.path.join(EXAMPLES, name), "w") as f:
                f.write(text)
            print(f"wrote sbatch/examples/{name}", file=sys.stderr)
