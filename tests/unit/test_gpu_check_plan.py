"""The GPU check's planning, without a GPU: the order its rows run in (every model measured before any is
measured twice), the time estimates it skips by, the models it does not try on a device too small for their
training state, the compiler it needs before compiling, and a test stage that cannot hang the whole check."""
import subprocess
import types

import pytest
import torch

from dit_scale.benchmarks import gpu_check


def test_every_model_gets_its_eager_row_before_any_compiled_one():
    names = [c["name"] for c in gpu_check.plan(("A", "B"), (32, 64), compile_=True, dry=False)]
    assert names == ["A eager", "B eager", "A compiled", "B compiled", "A mask 0.75 token budget",
                     "B mask 0.75 token budget", "A compiled reduce-overhead", "B compiled reduce-overhead"]
    specs = {c["name"]: c for c in gpu_check.plan(("A", "B"), (32, 64), compile_=True, dry=False)}
    assert specs["B mask 0.75 token budget"]["reference"] == "B compiled"       # ran before it
    assert specs["B compiled reduce-overhead"]["best_of"] == "B compiled"
    # the dry run compiles the first model only, at its first batch; its budget rows compare with eager
    dry = {c["name"]: c for c in gpu_check.plan(("A", "B"), (2, 4), compile_=True, dry=True)}
    assert list(dry) == ["A eager", "B eager", "A compiled", "B mask 0.75 token budget", "A mask 0.75 token budget",
                         "A compiled reduce-overhead"]
    assert dry["A compiled"]["batches"] == [2] and dry["A mask 0.75 token budget"]["reference"] == "A eager"


def test_estimates_come_from_the_same_model_and_mode_first():
    budget = gpu_check.Budget(8.0)
    assert budget.config_estimate("A", None) == 0.0
    assert budget.config_estimate("A", "default") == gpu_check.COMPILE_GUESS_S
    budget.first_point("A", None, 10.0)
    budget.first_point("B", None, 40.0)                     # a bigger model builds slower
    assert budget.config_estimate("A", None) == 10.0
    assert budget.config_estimate("B", "default") == 40.0 + gpu_check.COMPILE_GUESS_S   # its own, plus compiling
    budget.first_point("A", "default", 70.0)
    assert budget.config_estimate("C", "default") == 70.0   # an unseen model: the mode's longest
    assert budget.config_estimate("C", "reduce-overhead") == 70.0 + gpu_check.COMPILE_GUESS_S


def test_a_model_whose_training_state_exceeds_the_device_is_not_built(monkeypatch):
    """20 bytes a parameter (fp32 weights, EMA, gradients, two AdamW moments): DiT-XL/2-8E2A's 4.17B parameters
    need about 78 GiB, more than an 80 GB H100 holds; DiT-XL/2's 0.67B need 13 GiB."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=int(79.1 * gib)))    # an H100 80GB
    cuda = torch.device("cuda", 0)
    why = gpu_check.state_too_large("DiT-XL/2-8E2A", cuda, dry=False)
    assert why.startswith("4.17B parameters need about 78 GiB") and why.endswith("this device has 79 GiB"), why
    assert gpu_check.state_too_large("DiT-XL/2", cuda, dry=False) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=int(139.8 * gib)))   # an H200
    assert gpu_check.state_too_large("DiT-XL/2-8E2A", cuda, dry=False) is None
    assert gpu_check.state_too_large("DiT-XL/2-8E2A", torch.device("cpu"), dry=True) is None


def test_compiling_on_a_gpu_needs_a_c_compiler_and_pythons_headers(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert "no C compiler" in gpu_check.compile_toolchain_problem(False, None)
    assert "no C++ compiler" in gpu_check.compile_toolchain_problem(True, None)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert gpu_check.compile_toolchain_problem(False, None).startswith(f"no {tmp_path}/Python.h")
    (tmp_path / "Python.h").write_text("")
    assert gpu_check.compile_toolchain_problem(False, None) is None
    assert gpu_check.compile_toolchain_problem(True, "/usr/bin/g++") is None


def test_a_hanging_test_stage_is_a_failed_stage(monkeypatch):
    def hang(command, **kwargs):
        assert kwargs["timeout"] == gpu_check.TESTS_TIMEOUT_S and f"--timeout={gpu_check.TEST_TIMEOUT_S}" in command
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output="tests/gpu/test_gpu_step.py .")
    monkeypatch.setattr(gpu_check.subprocess, "run", hang)
    report = gpu_check.run_gpu_tests()
    assert report["ok"] is False and report["summary"] == f"stopped after {gpu_check.TESTS_TIMEOUT_S} s"
    assert report["failures"] == ["tests/gpu/test_gpu_step.py ."]
