"""Run dit_scale on a GPU node that has its own PyTorch but no network: carry the other dependencies as wheels.

    # where pip reaches PyPI: the wheels of dit_scale's runtime dependencies, minus torch, for the node's Python
    python launch/wheelhouse.py download wheelhouse --python-version 3.12
    python launch/wheelhouse.py download wheelhouse --python-version 3.12 --node-packages node_freeze.txt
        # only what the node lacks, from its `python3 -m pip freeze > node_freeze.txt`
    # on the node (offline): install the wheels of the packages its Python lacks into a folder of their own
    python3 launch/wheelhouse.py install wheelhouse --target /tmp/dit_scale_site
    export PYTHONPATH=/tmp/dit_scale_site:$PWD
    DIT_SCALE_WHEELS=wheelhouse DIT_SCALE_PYTHON=python3 bash launch/gpu_check.sh --out gpu.json    # both at once

`download` resolves setup.py's install_requires, with the test runner the GPU check's first stage starts (pytest and
pytest-timeout from the dev extras), for the node's Python and platform (binary wheels only) in a scratch
virtual environment where torch (or every package of --node-packages) counts as installed, so the node's torch and
its CUDA libraries are neither fetched nor replaced, then fetches exactly the resolved wheels (about 50 MB for Python
3.12 with torch alone taken as installed; a few MB for a node with the usual scientific stack). DeepSpeed
(parallel.engine=deepspeed only; it builds against the torch it finds) is left out, and so is wandb unless
--with-wandb: the GPU check never imports it, and a training run on the node without it sets
logging.wandb=disabled (metrics.jsonl is written either way).
`install` puts in, without the network and without dependencies of their own, only the wheels whose distribution the
running Python does not have (a package the node already has, numpy say, stays the node's), and never touches the
node's own site-packages. Exit 2 with one sentence for a folder without wheels or a pip that cannot resolve.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEFT_OUT = {"torch", "deepspeed", "wandb"}          # the node's own; engine=deepspeed only; --with-wandb
TEST_RUNNER = {"pytest", "pytest-timeout"}            # launch/gpu_check.sh's first stage: pytest -m gpu
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


class WheelhouseError(Exception):
    """One sentence for the user; exit 2. Not dit_scale.errors.ConfigError: this file runs as a plain script on a node
    where dit_scale is not installed yet, so it imports only the standard library."""


def canonical(name: str) -> str:
    """PEP 503's normalised project name: 'Megatron_Core' -> 'megatron-core'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_keyword(name: str, setup_py: str = os.path.join(ROOT, "setup.py")):
    """The literal value of setup()'s keyword `name` in setup.py, read (not executed)."""
    tree = ast.parse(open(setup_py).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise WheelhouseError(f"{setup_py} has no {name}; is this a dit_scale checkout?")


def install_requires(setup_py: str = os.path.join(ROOT, "setup.py")) -> list:
    """setup.py's install_requires."""
    return list(setup_keyword("install_requires", setup_py))


def pytest_requirements(setup_py: str = os.path.join(ROOT, "setup.py")) -> list:
    """The dev extras' pytest and pytest-timeout (pytest.ini sets a per-test time limit), as pinned there."""
    dev = setup_keyword("extras_require", setup_py).get("dev", [])
    picked = [r for r in dev if requirement_project(r) in TEST_RUNNER]
    if {requirement_project(r) for r in picked} != TEST_RUNNER:
        raise WheelhouseError(f"{setup_py}'s extras_require['dev'] lacks one of {sorted(TEST_RUNNER)}.")
    return picked


def requirement_project(requirement: str) -> str:
    """'megatron-core>=0.16,<0.17' -> 'megatron-core'."""
    return canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def runtime_requirements(requires=None, wandb: bool = False) -> list:
    """install_requires without the packages in LEFT_OUT (wandb kept if `wandb`); `download` adds the test runner."""
    left_out = LEFT_OUT - {"wandb"} if wandb else LEFT_OUT
    return [r for r in (requires or install_requires()) if requirement_project(r) not in left_out]


def torch_version(requires=None) -> str:
    """The lowest torch install_requires allows ('torch>=2.13,<2.14' -> '2.13'): the version the resolver takes as
    installed."""
    for r in requires or install_requires():
        if requirement_project(r) == "torch":
            match = re.search(r">=\s*([0-9][0-9.]*)", r)
            if match:
                return match.group(1)
    raise WheelhouseError("setup.py's install_requires has no 'torch>=X' requirement to resolve against.")


def wheel_project(filename: str) -> str:
    """The canonical project name of a wheel file ('megatron_core-0.16.1-cp312-...whl' -> 'megatron-core')."""
    return canonical(os.path.basename(filename).split("-")[0])


def missing_wheels(folder: str, installed=None) -> list:
    """The wheels in `folder` whose project is not installed in this Python (`installed`: canonical names)."""
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl")) if os.path.isdir(folder) else []
    if not wheels:
        raise WheelhouseError(f"{folder} holds no .whl files; make it with `python launch/wheelhouse.py download "
                              f"{folder} --python-version X.Y` where pip reaches PyPI.")
    if installed is None:
        installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}
    return [os.path.join(folder, w) for w in wheels if wheel_project(w) not in installed]


def install(folder: str, target: str) -> list:
    """pip-install the missing wheels of `folder` into `target` (offline, no dependencies); returns them. A Python
    without pip (a bare python3 on a GPU node) gets them unpacked instead: a wheel is a zip of its import tree."""
    wheels = missing_wheels(folder)
    if not wheels:
        return wheels
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--upgrade", "--target", target, *wheels], check=True)
    else:
        for wheel in wheels:
            unpack_wheel(wheel, target)
    return wheels


def unpack_wheel(wheel: str, target: str) -> None:
    """Install `wheel` into the folder `target` the way `pip install --target` lays it out: its files at the top,
    the contents of its NAME.data/purelib and NAME.data/platlib merged in (scripts and headers are not needed to
    import it). Member names that would leave `target` are refused."""
    root = os.path.realpath(target)
    with zipfile.ZipFile(wheel) as z:
        for member in z.infolist():
            parts = member.filename.split("/")
            if len(parts) > 2 and parts[0].endswith(".data"):
                if parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            dest = os.path.realpath(os.path.join(root, *parts))
            if not dest.startswith(root + os.sep):
                raise WheelhouseError(f"{wheel} holds {member.filename!r}, which points outside {target}; rebuild "
                                      f"the wheelhouse with `launch/wheelhouse.py download`.")
            if member.is_dir():
                os.makedirs(dest, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = member.external_attr >> 16
            if mode & 0o111:
                os.chmod(dest, 0o755)


def node_packages(path: str) -> dict:
    """{name: version} from the node's `python3 -m pip freeze` (lines 'name==version'; others are skipped)."""
    out = {}
    with open(path) as f:
        for line in f:
            name, sep, version = line.strip().partition("==")
            if sep and name and not name.startswith("#"):
                out[name] = version.split(";")[0].strip()
    if not out:
        raise WheelhouseError(f"{path} has no 'name==version' lines; write it on the node with "
                              f"`python3 -m pip freeze > {os.path.basename(path)}`.")
    return out


def resolve(requirements: list, python_version: str, installed: dict, platforms=PLATFORMS) -> list:
    """(name, version) of every wheel `requirements` need on that Python and platform, the `installed` packages
    ({name: version}: torch at least) taken as there: pip's resolver in a scratch virtual environment holding only
    their records (a current pip: older ones refuse --platform with --dry-run)."""
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = os.path.join(tmp, "venv")
        venv.create(env_dir, with_pip=True)
        py = os.path.join(env_dir, "bin", "python")
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        for name, version in installed.items():
            if canonical(name) == "pip":
                continue
            record = os.path.join(site, f"{canonical(name).replace('-', '_')}-{version}.dist-info")
            os.makedirs(record, exist_ok=True)
            with open(os.path.join(record, "METADATA"), "w") as f:
                f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            open(os.path.join(record, "RECORD"), "w").close()
        report = os.path.join(tmp, "report.json")
        cmd = [py, "-m", "pip", "install", "--quiet", "--dry-run", "--report", report, "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp"]
        for platform in platforms:
            cmd += ["--platform", platform]
        if subprocess.run(cmd + requirements).returncode != 0:
            raise WheelhouseError(f"pip could not resolve binary wheels of {' '.join(requirements)} for Python "
                                  f"{python_version}; try the node's exact --python-version.")
        with open(report) as f:
            items = json.load(f)["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in items]


def download(folder: str, python_version: str, wandb: bool = False, node: str = None) -> list:
    """Fetch the resolved wheels into `folder` and list them in folder/requirements.txt; `node`: the node's pip
    freeze, whose packages are not fetched (without it, torch alone)."""
    installed = node_packages(node) if node else {}
    if not any(canonical(name) == "torch" for name in installed):
        installed["torch"] = torch_version()
    pins = [f"{name}=={version}" for name, version in
            resolve(runtime_requirements(wandb=wandb) + pytest_requirements(), python_version, installed)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", folder,
           "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + pins, check=True)
    with open(os.path.join(folder, "requirements.txt"), "w") as f:
        f.write("\n".join(pins) + "\n")
    return pins


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("download", help="fetch the wheels (where pip reaches PyPI)")
    d.add_argument("folder")
    d.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the node's Python, e.g. 3.12 (default: this one's)")
    d.add_argument("--node-packages", metavar="FREEZE_TXT",
                   help="the node's `python3 -m pip freeze`: fetch only what it lacks (default: all but torch)")
    d.add_argument("--with-wandb", action="store_true",
                   help="also wandb and its dependencies (training logs to wandb unless logging.wandb=disabled)")
    i = sub.add_parser("install", help="install the wheels this Python lacks (offline)")
    i.add_argument("folder")
    i.add_argument("--target", required=True, help="a folder of their own; put it first on PYTHONPATH")
    args = parser.parse_args(argv)
    try:
        if args.what == "download":
            pins = download(args.folder, args.python_version, args.with_wandb, args.node_packages)
            print(f"[wheelhouse] {len(pins)} wheels for Python {args.python_version} in {args.folder}")
        else:
            wheels = install(args.folder, args.target)
            print(f"[wheelhouse] installed {len(wheels)} missing of the wheels in {args.folder} into {args.target}",
                  file=sys.stderr)
    except WheelhouseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
