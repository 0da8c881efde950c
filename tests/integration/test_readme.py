"""Every command the docs' quick sections show (docs/configuration.md "Configs", docs/models.md "Models",
docs/training.md "Training") runs as written, with tiny step counts and a tiny model on the tiny shards appended as
later overrides, and writes into a temporary folder."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from tiny import ROOT, TINY_MODEL, as_overrides

# (page, heading): a section runs from its heading to the next heading of the same or a higher level
QUICK_SECTIONS = (("docs/configuration.md", "## Configs"), ("docs/models.md", "## Models"),
                  ("docs/training.md", "## Training"))


def doc_section(page: str, heading: str) -> str:
    """The text of the first section of `page` (README.md or a docs page) whose heading line starts with `heading`,
    down to the next heading of the same or a higher level (its subsections included)."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    level = len(heading) - len(heading.lstrip("#"))
    lines, out, inside, fence = text.splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^(#+) ", line)
        if m and inside and len(m.group(1)) <= level:
            break
        if m and not inside and line.startswith(heading):
            inside = True
        if inside:
            out.append(line)
    assert out, f"{page} has no section {heading!r}"
    return "\n".join(out) + "\n"


def bash_commands(text: str) -> list:
    """argv of every command line in the ```bash blocks of `text` (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line:
                out.append(shlex.split(line))
    return out


def readme_commands():
    """(section, argv) of every command line in a ```bash block of the quick sections."""
    return [(f"{page} {heading}", argv) for page, heading in QUICK_SECTIONS
            for argv in bash_commands(doc_section(page, heading))]


def test_the_quick_sections_have_commands():
    sections = {s for s, _ in readme_commands()}
    assert sections == {f"{page} {heading}" for page, heading in QUICK_SECTIONS}, sections
    assert len(readme_commands()) >= 4, readme_commands()      # train override, two model_info, sample


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
                         else v.split("## ")[-1][:20])
def test_readme_command_runs(section, argv, tiny_shards, quickstart_run):
    argv = [a.replace("runs/", f"{quickstart_run}/") for a in argv]
    assert argv[0] == ".venv/bin/python", argv
    argv[0] = sys.executable
    if argv[1] == "launch/train.py":
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("train.run_dir="))
        argv += tiny_run(tiny_shards, run_dir)          # later overrides win: the docs' own ones are checked too
    if argv[1] == "launch/sample.py":
        argv += ["--steps", "2"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
