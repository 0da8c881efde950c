"""launch/wheelhouse.py: which requirements a wheelhouse resolves (setup.py's, against the installed package's own
metadata), which wheels an offline node installs (only what its Python lacks), and a real offline install of a
wheel built here. `download` needs PyPI and is not run here."""
import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

from launch import wheelhouse
from tiny import ROOT


def _wheel(folder, name, version="0.1", body="VALUE = 42\n"):
    """A minimal pure-Python wheel of one module `name`."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": body,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
    return path


def test_the_runtime_requirements_are_the_installed_packages_own_minus_torch_deepspeed_and_wandb():
    def parsed(reqs):
        return {(wheelhouse.canonical(r.name), r.specifier) for r in map(Requirement, reqs)}
    installed = [r for r in importlib.metadata.requires("dit_scale") if "extra ==" not in r]
    kept = [r for r in installed if wheelhouse.requirement_project(r) not in wheelhouse.LEFT_OUT]
    assert parsed(wheelhouse.runtime_requirements()) == parsed(kept)
    assert len(kept) == len(installed) - 3
    assert {"megatron-core", "omegaconf", "webdataset"} <= {wheelhouse.requirement_project(r)
                                                           for r in wheelhouse.runtime_requirements()}
    assert wheelhouse.torch_version() == "2.13"


def test_the_wheelhouse_carries_the_gpu_checks_test_runner_as_the_dev_extras_pin_it():
    dev = [r.split(";")[0].strip() for r in importlib.metadata.requires("dit_scale") if 'extra == "dev"' in r]
    runner = {(r.name, r.specifier) for r in map(Requirement, dev) if r.name in ("pytest", "pytest-timeout")}
    assert {(r.name, r.specifier) for r in map(Requirement, wheelhouse.pytest_requirements())} == runner
    assert len(runner) == 2


def test_only_the_wheels_of_missing_projects_are_installed(tmp_path):
    for name in ("megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl", "PyYAML-6.0.4-cp312-cp312-x.whl",
                 "omegaconf-2.4.0-py3-none-any.whl", "requirements.txt"):
        (tmp_path / name).write_text("")
    picked = wheelhouse.missing_wheels(str(tmp_path), installed={"pyyaml", "numpy"})
    assert [os.path.basename(p) for p in picked] == ["megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl",
                                                     "omegaconf-2.4.0-py3-none-any.whl"]
    assert wheelhouse.missing_wheels(str(tmp_path), installed={"pyyaml", "megatron-core", "omegaconf"}) == []


def test_install_puts_the_missing_wheel_in_the_target_offline_and_leaves_installed_projects_alone(tmp_path):
    house, target = tmp_path / "wheelhouse", tmp_path / "site"
    house.mkdir()
    _wheel(str(house), "dit_scale_test_tinymod")
    _wheel(str(house), "tqdm", version="0.0.1", body="raise ImportError('the wheelhouse tqdm shadowed the real one')\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "wheelhouse.py"), "install", str(house),
                           "--target", str(target)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "installed 1 missing" in proc.stderr
    assert sorted(os.listdir(target)) == ["dit_scale_test_tinymod", "dit_scale_test_tinymod-0.1.dist-info"]
    check = subprocess.run([sys.executable, "-c", "import dit_scale_test_tinymod, tqdm; "
                            "print(dit_scale_test_tinymod.VALUE, tqdm.__version__ != '0.0.1')"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=120)
    assert check.stdout.split() == ["42", "True"], check.stderr


def _tree(folder):
    """{relative path: bytes} of the importable files (the dist-info bookkeeping differs between installers)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if ".dist-info" not in rel and "__pycache__" not in rel:
                out[rel] = open(os.path.join(root, name), "rb").read()
    return out


def test_without_pip_the_wheels_are_unpacked_as_pip_lays_them_out(tmp_path, monkeypatch):
    """A bare python3 on a GPU node may have no pip: the wheels are unpacked instead, into the same tree pip
    installs (a NAME.data/purelib part merged into the top), and a member that would leave the target is refused."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    wheel = _wheel(str(house), "dit_scale_test_tinymod")
    with zipfile.ZipFile(wheel, "a") as z:
        z.writestr("dit_scale_test_tinymod-0.1.data/purelib/dit_scale_test_extra.py", "EXTRA = 1\n")
    wheelhouse.install(str(house), str(tmp_path / "with_pip"))
    real_run = subprocess.run

    def no_pip(command, **kwargs):
        if command[1:] == ["-m", "pip", "--version"]:
            return subprocess.CompletedProcess(command, 1)
        raise AssertionError(f"pip was called without pip: {command}")
    monkeypatch.setattr(wheelhouse.subprocess, "run", no_pip)
    assert wheelhouse.install(str(house), str(tmp_path / "without_pip")) == [wheel]
    monkeypatch.setattr(wheelhouse.subprocess, "run", real_run)
    unpacked = _tree(tmp_path / "without_pip")
    assert unpacked == _tree(tmp_path / "with_pip")
    assert set(unpacked) == {"dit_scale_test_tinymod/__init__.py", "dit_scale_test_extra.py"}
    evil = str(tmp_path / "evil-0.1-py3-none-any.whl")
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.py", "")
    with pytest.raises(wheelhouse.WheelhouseError, match="points outside"):
        wheelhouse.unpack_wheel(evil, str(tmp_path / "target"))
    assert not (tmp_path / "outside.py").exists()


def test_a_folder_without_wheels_is_one_sentence_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "wheelhouse.py"), "install",
                           str(tmp_path / "none"), "--target", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "holds no .whl files" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    with pytest.raises(wheelhouse.WheelhouseError, match="no .whl"):
        wheelhouse.missing_wheels(str(tmp_path))


def test_the_gpu_check_installs_from_the_wheelhouse_before_it_starts(tmp_path):
    house = tmp_path / "wheelhouse"
    house.mkdir()
    _wheel(str(house), "dit_scale_test_tinymod")
    env = {**os.environ, "DIT_SCALE_PYTHON": sys.executable, "DIT_SCALE_WHEELS": str(house), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_check.sh"), "--help"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout
    assert (tmp_path / "dit_scale_site" / "dit_scale_test_tinymod" / "__init__.py").is_file()


def test_the_nodes_pip_freeze_names_what_counts_as_installed(tmp_path):
    freeze = tmp_path / "node_freeze.txt"
    freeze.write_text("# a comment\nnumpy==2.5.2\ntorch==2.11.0+cu130\n-e git+https://x/y.git#egg=z\n"
                      "tzdata @ file:///tmp/tzdata.whl\nPyYAML==6.0.3\n")
    assert wheelhouse.node_packages(str(freeze)) == {"numpy": "2.5.2", "torch": "2.11.0+cu130", "PyYAML": "6.0.3"}
    freeze.write_text("-e .\n")
    with pytest.raises(wheelhouse.WheelhouseError, match="pip freeze"):
        wheelhouse.node_packages(str(freeze))
