"""The layering docs/architecture.md describes, checked on the source: no import cycle between dit_scale's modules
(function-level imports included), models/ imports nothing of dit_scale outside it, config/ nothing above it
(config/, errors.py, models/, diffusion/), errors.py nothing at all, the private torch / DeepSpeed
APIs are used only in compat.py (and torch._grouped_mm in models/moe.py), no module edits sys.path, and start-up
leaves torchmetrics (and, for a bad config, the trainer) to what needs them; every launch/ script reads its arguments
before it imports torch."""
import ast
import os
import re
import subprocess
import sys

from tiny import ROOT

PACKAGE = os.path.join(ROOT, "dit_scale")


def modules() -> dict:
    """{module name: source path} for every module of dit_scale."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(path: str, name: str, known: dict) -> set:
    """dit_scale modules that `path` imports anywhere in its body (a `from pkg import sub` counts as pkg.sub)."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def graph() -> dict:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(edges: dict) -> list:
    """The import cycles of a graph {node: nodes it imports} (each as a path back to its start)."""
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles():
    # a package's __init__ re-exporting its own submodules is how packages work, not a cycle of concepts
    edges = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph().items()}
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_cycles_between_parts():
    """No cycle between dit_scale's parts (a subpackage or a loose module, e.g. generation/ and evaluation/): one
    part's module importing another part whose modules import the first is an import running back up the layers."""
    def part(name: str) -> str:
        return ".".join(name.split(".")[:2])
    edges = {}
    for a, deps in graph().items():
        edges.setdefault(part(a), set()).update(part(b) for b in deps if part(b) != part(a))
    found = cycles(edges)
    assert not found, "cycles between parts: " + "; ".join(" -> ".join(c) for c in found)


def test_models_import_only_models():
    for name, deps in graph().items():
        if name.startswith("dit_scale.models"):
            outside = {d for d in deps if not d.startswith("dit_scale.models")}
            assert not outside, f"{name} imports {sorted(outside)}"


CONFIG_LAYER = ("dit_scale.config", "dit_scale.errors", "dit_scale.models", "dit_scale.diffusion")


def test_config_imports_only_what_lies_below_it():
    """dit_scale.config (the package and its submodules) imports nothing of dit_scale outside dit_scale.config,
    dit_scale.errors, dit_scale.models and dit_scale.diffusion, directly or through what those import (function-level
    imports included): every module may read a config without the config reaching back up."""
    edges = graph()
    todo = [name for name in edges if name == "dit_scale.config" or name.startswith("dit_scale.config.")]
    seen = set(todo)
    while todo:
        name = todo.pop()
        for dep in edges[name]:
            assert any(dep == p or dep.startswith(p + ".") for p in CONFIG_LAYER), f"{name} imports {dep}"
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)


def test_errors_module_is_a_leaf():
    """dit_scale.errors (ConfigError, DataError, CheckpointError) imports nothing of dit_scale: any module may
    import it."""
    assert graph()["dit_scale.errors"] == set()


PRIVATE = re.compile(r"\b(torch\.optim\.optimizer\._|torch\._foreach|_EmptyStateDictLoadPlanner|_load_state_dict\b|"
                     r"groups\._|_configure_distributed_model|_lazy_init_hp|_get_norm_groups|torch\._grouped_mm)")


def test_private_apis_live_in_compat():
    for name, path in modules().items():
        if name in ("dit_scale.compat",):
            continue
        for i, line in enumerate(open(path), 1):
            code = line.split("#")[0]
            if PRIVATE.search(code) and not (name == "dit_scale.models.moe" and "torch._grouped_mm" in code):
                raise AssertionError(f"{path}:{i} uses a private API outside dit_scale/compat.py: {line.strip()}")


def test_no_sys_path_edits():
    """Nothing edits the import path: the package is installed, tests/ is on it through pytest.ini."""
    conftest = open(os.path.join(ROOT, "tests", "conftest.py")).read()
    assert "sys.path" not in conftest
    roots = [PACKAGE, os.path.join(ROOT, "launch"), os.path.join(ROOT, "data_tools")]
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(folder, f)).read()
                    assert "sys.path.insert" not in text and "sys.path.append" not in text, os.path.join(folder, f)


def _imported_after(code: str) -> set:
    """The top-level packages a fresh Python holds after running `code` (which prints nothing else)."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] "
                          "for m in sys.modules})))"], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_start_up_leaves_the_heavy_imports_to_what_needs_them():
    """Every rank imports the trainer at start: torchmetrics (which imports transformers and scipy, ~3 s on 2 cores)
    only comes with an evaluation's feature gathering, megatron-core with an MoE model's first router. Checking a
    config imports no torch (~2 s; far more from a cluster's shared file system on a login node): launch/train.py
    reports a config mistake before it imports the trainer, and launch/submit.py checks the config of a job without
    torch."""
    trainer = _imported_after("import dit_scale.training.trainer")
    assert not {"megatron", "torchmetrics", "transformers", "scipy"} & trainer
    # megatron-core (~4 s) comes with the first router: a dense model never imports it
    build = ("from dit_scale.build import meta_model, model_args\nfrom dit_scale.config import load_config\n"
             "meta_model(model_args(load_config(None, ['model.name=%s'])))")
    assert "megatron" not in _imported_after(build % "DiT-XS/4")
    assert "megatron" in _imported_after(build % "DiT-XS/4-4E2A")
    refused = _imported_after("from launch.train import main\nimport contextlib, io\nwith contextlib.redirect_stderr("
                              "io.StringIO()):\n    assert main(['--config', 'configs/quickstart.yaml', "
                              "'moe.top_k=9']) == 2")
    assert not {"torch", "megatron", "torchmetrics"} & refused
    # every check that counts kept tokens or names samplers: the token budget, a cp split of the kept tokens
    checked = _imported_after("from dit_scale.config import load_config\nload_config('configs/quickstart.yaml', "
                              "['mask.ratio=0.75', 'mask.scale_batch=true', 'parallel.engine=fsdp', "
                              "'parallel.cp=2', 'diffusion.sampler=heun'])")
    assert "omegaconf" in checked and "torch" not in checked
    submitted = _imported_after("from launch.submit import main\nimport contextlib, io\nwith contextlib.redirect_stdout("
                                "io.StringIO()):\n    assert main(['--config', 'configs/quickstart.yaml', '--run-dir', "
                                "'runs/x', '--gpus-per-node', '8', '--time', '01:00:00', '--dry-run', "
                                "'parallel.engine=fsdp']) == 0")
    assert "torch" not in submitted


def test_every_entry_point_reads_its_arguments_before_importing_torch():
    """`--help` and an argument mistake answer at once: each launch/ script imports torch (~2 s on 2 cores) and the
    library (up to 6 s more) only after argparse has read the command line. One fresh Python runs every script's
    --help in turn and names the first that leaves torch imported."""
    code = """
import contextlib, glob, io, os, runpy, sys
for path in sorted(glob.glob(os.path.join('launch', '*.py'))):
    if path.endswith('__init__.py'):
        continue
    sys.argv = [path, '--help']
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name='__main__')
    except SystemExit as e:
        assert e.code in (0, None), (path, e.code)
    assert 'usage:' in out.getvalue(), path
    assert 'torch' not in sys.modules, path + ' imports torch before reading its arguments'
    print(path)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.split()) >= 15        # every script ran (16 today)
