"""Every command the README's quick sections show (Configs, Models, Training) runs as written, with tiny step counts
and a tiny model on the tiny shards appended as later overrides, and writes into a temporary folder."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from tiny import ROOT, TINY_MODEL, as_overrides

QUICK_SECTIONS = ("### Configs", "### Models", "### Training")


def readme_commands():
    """(section, argv) of every command line in a ```bash block of the quick sections."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.finditer(r"^(#+ .*?)$|```bash\n(.*?)```", text, flags=re.M | re.S):
        if block.group(1):
            section = block.group(1)
            continue
        if section.startswith(QUICK_SECTIONS):
            for line in block.group(2).replace("\\\n", " ").splitlines():
                line = line.split("#")[0].strip()
                if line:
                    out.append((section, shlex.split(line)))
    return out


def test_the_quick_sections_have_commands():
    sections = {s.split("(")[0].strip() for s, _ in readme_commands()}
    assert sections == {"### Configs", "### Models", "### Training"}, sections


@pytest.fixture(scope="module")
def quickstart_run(tiny_shards, tmp_path_factory):
    """runs/quickstart as the quickstart leaves it (tiny: 2 steps), for the commands that read it."""
    runs = tmp_path_factory.mktemp("readme") / "runs"
    subprocess.run([sys.executable, "launch/train.py", "--config", "configs/quickstart.yaml",
                    *tiny_run(tiny_shards, runs / "quickstart")], cwd=ROOT, check=True, capture_output=True)
    return runs


def tiny_run(shards, run_dir):
    return as_overrides({**TINY_MODEL, "model.num_classes": 10, "data.path": shards, "data.batch_size": 4,
                         "train.steps": 2, "train.run_dir": str(run_dir), "logging.wandb": "disabled",
                         "logging.progress_bar": False, "diffusion.sample_steps": 2,
                         "logging.samples_per_class": 1})


@pytest.mark.parametrize("section, argv", readme_commands(), ids=lambda v: " ".join(v)[:60] if isinstance(v, list)
                         else v[4:20])
def test_readme_command_runs(section, argv, tiny_shards, quickstart_run):
    argv = [a.replace("runs/", f"{quickstart_run}/") for a in argv]
    assert argv[0] == ".venv/bin/python", argv
    argv[0] = sys.executable
    if argv[1] == "launch/train.py":
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("train.run_dir="))
        argv += tiny_run(tiny_shards, run_dir)          # later overrides win: the README's own ones are checked too
    if argv[1] == "launch/sample.py":
        argv += ["--steps", "2"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
