"""The captioned quickstart's commands (docs/text-to-image.md, "The captioned quickstart") run as written, in order,
with tiny sizes appended as later arguments (argparse and config overrides: the last one wins) and data/ and runs/ moved into a temporary folder; the random
Inception weights stand in for the FID file. Marked slow (seven processes, about a minute): CI's second stage."""
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

from eval_utils import write_random_inception
from tiny import ROOT, TINY_MODEL, TINY_RUN, as_overrides

PAGE, SECTION = "docs/text-to-image.md", "## The captioned quickstart"


def section_commands():
    """argv of every command line of the section's first ```bash block (the section ends at the next heading of its
    level or higher, outside code blocks)."""
    text = open(os.path.join(ROOT, PAGE), encoding="utf-8").read()
    start = text.index("\n" + SECTION) + 1
    body = text[start:]
    ends = [m.start() for m in re.finditer(r"^#{1,2} ", body, flags=re.M) if m.start() > 0
            and body[:m.start()].count("```") % 2 == 0]
    body = body[:ends[0]] if ends else body
    block = re.search(r"```bash\n(.*?)```", body, flags=re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_section_shows_the_workflow():
    tools = [argv[1] for argv in section_commands()]
    assert tools == ["-m", "data_tools/make_synthetic.py", "launch/train.py", "launch/sample.py",
                     "data_tools/make_synthetic.py", "launch/evaluate.py"], tools
    assert all(argv[0] == ".venv/bin/python" for argv in section_commands())


@pytest.mark.slow
def test_the_text_to_image_commands_run(tmp_path):
    inception = write_random_inception(str(tmp_path / "inception.pth"))
    data, runs = tmp_path / "data", tmp_path / "runs"
    tiny_model = {k: v for k, v in TINY_MODEL.items() if k != "model.num_classes"}
    for argv in section_commands():
        argv = [a.replace("data/", f"{data}/").replace("runs/", f"{runs}/") for a in argv]
        argv[0] = sys.executable
        tool = argv[2] if argv[1] == "-m" else argv[1]
        if tool.endswith("make_synthetic.py"):
            argv += ["--num-samples", "48", "--samples-per-shard", "24", "--size", "16"]
        elif tool == "launch/train.py":
            argv += as_overrides({**tiny_model, **TINY_RUN, "data.path": f"{data}/synthetic_text",
                                  "model.text_encoder": f"{data}/tiny_t5", "train.run_dir": f"{runs}/quickstart_text",
                                  "train.steps": 2, "logging.max_sample_classes": 2, "diffusion.sample_steps": 2,
                                  "data.partitions": 8})                     # 48 captioned images
        elif tool == "launch/sample.py":
            argv += ["--steps", "2", "--per-prompt", "1"]
        elif tool == "launch/evaluate.py":
            argv[argv.index("--inception") + 1] = inception
            argv += ["--num-samples", "4", "--batch-size", "2", "--out", str(tmp_path / "eval.json"), "--no-log"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
    assert os.path.isfile(runs / "quickstart_text" / "samples" / "prompts.png")
    result = json.load(open(tmp_path / "eval.json"))
    assert math.isfinite(result["fid"]) and result["captions"].startswith(f"{data}/synthetic_text_val")
