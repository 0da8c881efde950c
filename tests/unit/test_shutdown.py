"""How the entry points end (dit_scale/parallel/shutdown.py): after a run with a process group, the group is destroyed,
the atexit handlers run and the output is flushed, and the interpreter's teardown is skipped (where a gloo / NCCL
thread kept alive by torch can abort the process); without a group, a plain sys.exit with its teardown. Each case runs
`run_main` in a fresh Python and reads what it left: exit code, output, an atexit file, and a line that an object's
__del__ writes only when the teardown collects it.

    .venv/bin/python -m pytest -q tests/unit/test_shutdown.py
"""
import subprocess
import sys

from tiny import ROOT

SCRIPT = """
import atexit, os, sys
from dit_scale.parallel.shutdown import run_main

class Teardown:
    def __del__(self):
        sys.stderr.write("teardown ran\\n")

keep = Teardown()                   # collected only by the interpreter's teardown

def report():
    dist = sys.modules.get("torch.distributed")
    with open(sys.argv[2], "w") as f:
        f.write("group alive" if dist is not None and dist.is_initialized() else "no group")
atexit.register(report)

def main():
    if sys.argv[1] != "none":
        import torch.distributed as dist
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    sys.stdout.write("result without a newline")    # buffered: must reach the pipe anyway
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    return 5

run_main(main)
"""


def _run(tmp_path, mode):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    mark = tmp_path / "atexit.txt"
    proc = subprocess.run([sys.executable, str(script), mode, str(mark)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    return proc, mark.read_text() if mark.exists() else None


def test_without_a_process_group_the_exit_is_plain(tmp_path):
    proc, mark = _run(tmp_path, "none")
    assert proc.returncode == 5 and proc.stdout == "result without a newline" and mark == "no group"
    assert "teardown ran" in proc.stderr                # sys.exit: the interpreter tore itself down


def test_after_a_process_group_the_teardown_is_skipped(tmp_path):
    proc, mark = _run(tmp_path, "gloo")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "result without a newline"     # flushed
    assert mark == "no group"                            # atexit handlers ran, after the group was destroyed
    assert "teardown ran" not in proc.stderr             # no teardown: no gloo thread can meet a dying interpreter


def test_an_exception_destroys_the_group_and_propagates(tmp_path):
    proc, mark = _run(tmp_path, "raise")
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr and mark == "no group"
