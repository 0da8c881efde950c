"""The sweep file and its expansion: grid or random points over config keys, × widths, each a checked run.

    sweep = load_sweep("configs/sweeps/mutransfer_mup.yaml")
    runs = expand(sweep)        # [{"name": "w128_lr0.001", "width", "params", "argv": ["launch/train.py", ...]}]
"""
import itertools
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List

from omegaconf import OmegaConf

from dit_scale.config import load_config, merge, width_overrides
from dit_scale.errors import ConfigError
from dit_scale.training.slurm import ROOT


@dataclass
class SlurmConfig:
    partition: str = ""
    time: str = "04:00:00"
    nodes: int = 1
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    max_parallel: int = 0               # 0: no limit on concurrent array tasks
    signal_grace: int = 0               # USR1 seconds before `time` (0: max(300, 2 × the runs' slowest save + 60))
    extra: List[str] = field(default_factory=list)   # more `#SBATCH ...` option strings, e.g. "--account=abc"


@dataclass
class SweepConfig:
    train_config: str = "../quickstart.yaml"   # relative to the sweep file
    out: str = "runs/sweeps/default"
    widths: List[int] = field(default_factory=lambda: [128])
    search: str = "grid"                # grid | random
    num_samples: int = 8                # random search: points drawn
    seed: int = 0
    params: Dict[str, Any] = field(default_factory=dict)   # grid: key -> [values]; random: key -> {log_uniform|uniform|choice: [...]}
    overrides: List[str] = field(default_factory=list)     # fixed key=value overrides for every run
    smooth: int = 5                     # aggregate: mean of the last `smooth` logged losses
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def load_sweep(path: str):
    """The sweep file merged over SweepConfig's defaults; its train_config made relative to the repository."""
    if not os.path.isfile(path):
        raise ConfigError(f"Sweep file '{path}' does not exist.")
    sweep = merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path), f"'{path}'")
    if sweep.search not in ("grid", "random"):
        raise ConfigError(f"search={sweep.search!r} in '{path}' is not allowed; choose grid or random.")
    if not sweep.params or not sweep.widths:
        raise ConfigError(f"Sweep file '{path}' needs at least one entry in params and in widths.")
    sweep.train_config = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(path)), sweep.train_config),
                                         ROOT)
    return sweep


def sample_value(key: str, spec, rng: random.Random):
    """One random-search draw of params.`key` from its {log_uniform|uniform|choice: [...]} spec."""
    (kind, args), = dict(spec).items()
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "choice":
        return rng.choice(list(args))
    raise ConfigError(f"params.{key} uses {kind!r}; random search allows log_uniform, uniform or choice.")


def points(sweep) -> List[dict]:
    """The hyperparameter points ({key: value}): the grid's product, or `num_samples` seeded random draws."""
    keys = list(sweep.params)
    if sweep.search == "grid":
        for key in keys:
            if not OmegaConf.is_list(sweep.params[key]):
                raise ConfigError(f"params.{key} must be a list of values for search=grid.")
        return [dict(zip(keys, combo)) for combo in itertools.product(*(list(sweep.params[k]) for k in keys))]
    rng = random.Random(sweep.seed)
    return [{k: sample_value(k, sweep.params[k], rng) for k in keys} for _ in range(sweep.num_samples)]


def run_name(width: int, point: dict) -> str:
    """The run's directory name: w<width>, then each key's last part and its value (e.g. w128_lr0.000977)."""
    parts = [f"w{width}"] + [f"{k.split('.')[-1]}{v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}{v}"
                             for k, v in point.items()]
    return "_".join(parts)


def expand(sweep) -> List[dict]:
    """Every (point, width) as {name, width, params, argv}; each run's config is validated here."""
    train_config = os.path.join(ROOT, sweep.train_config)
    base = load_config(train_config, list(sweep.overrides))
    runs = []
    for point in points(sweep):
        for width in sweep.widths:
            name = run_name(width, point)
            overrides = (list(sweep.overrides) + width_overrides(base.model, width)
                         + [f"{k}={v}" for k, v in point.items()]
                         + [f"train.run_dir={os.path.join(sweep.out, name)}", "logging.progress_bar=false",
                            "train.resume=auto"])   # a run cut short (or requeued) continues from its checkpoint
            load_config(train_config, overrides)            # fail now, not in the 30th job
            runs.append({"name": name, "width": width, "params": point,
                         "argv": ["launch/train.py", "--config", sweep.train_config] + overrides})
    return runs
