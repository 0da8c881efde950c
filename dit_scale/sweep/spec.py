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
    try:
        text = OmegaConf.load(path)
    except Exception as e:                      # noqa: BLE001 -- YAML syntax: one sentence naming the file
        raise ConfigError(f"Sweep file '{path}' is not valid YAML ({str(e).splitlines()[0]}); fix it.") from None
    sweep = merge(OmegaConf.structured(SweepConfig), text, f"'{path}'")
    if sweep.search not in ("grid", "random"):
        raise ConfigError(f"search={sweep.search!r} in '{path}' is not allowed; choose grid or random.")
    if not sweep.params or not sweep.widths:
        raise ConfigError(f"Sweep file '{path}' needs at least one entry in params and in widths.")
    if sweep.search == "random" and sweep.num_samples < 1:
        raise ConfigError(f"num_samples={sweep.num_samples} in '{path}': random search draws at least 1 point.")
    sweep.train_config = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(path)), sweep.train_config),
                                         ROOT)
    return sweep


def sample_value(key: str, spec, rng: random.Random):
    """One random-search draw of params.`key` from its {log_uniform|uniform|choice: [...]} spec."""
    kind, args = check_random_spec(key, spec)
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "choice":
        return rng.choice(list(args))
    raise ConfigError(f"params.{key} uses {kind!r}; random search allows log_uniform, uniform or choice.")


def check_random_spec(key: str, spec) -> tuple:
    """(kind, values) of a random-search spec, or one sentence naming params.`key` and the form it needs."""
    form = ("a mapping of one kind to its values: {log_uniform: [low, high]} (0 < low <= high), {uniform: [low, "
            "high]} or {choice: [a, b, ...]}")
    if not OmegaConf.is_dict(spec) or len(spec) != 1:
        got = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        raise ConfigError(f"params.{key} must be {form}; got {got!r}.")
    (kind, args), = dict(spec).items()
    if kind not in ("log_uniform", "uniform", "choice"):
        raise ConfigError(f"params.{key} uses {kind!r}; random search allows log_uniform, uniform or choice.")
    values = list(args) if OmegaConf.is_list(args) else None
    if kind == "choice" and not values:
        raise ConfigError(f"params.{key}: choice needs a non-empty list of values.")
    if kind != "choice":
        numbers = values is not None and len(values) == 2 and all(isinstance(v, (int, float)) and
                                                                  math.isfinite(v) for v in values)
        if not numbers or values[0] > values[1] or (kind == "log_uniform" and values[0] <= 0):
            raise ConfigError(f"params.{key}: {kind} needs [low, high], two finite numbers with low <= high"
                              f"{' and low > 0' if kind == 'log_uniform' else ''}; got {values if values else args!r}.")
    return kind, values


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


def run_name(width: int, point: dict, digits: int = 3) -> str:
    """The run's directory name: w<width>, then each key's last part and its value (e.g. w128_lr0.000977), floats
    with `digits` significant digits."""
    parts = [f"w{width}"] + [f"{k.split('.')[-1]}{v:.{digits}g}" if isinstance(v, float) else f"{k.split('.')[-1]}{v}"
                             for k, v in point.items()]
    return "_".join(parts)


def name_digits(sweep_points: List[dict], widths) -> int:
    """The fewest significant digits (3 or more) that give every (point, width) its own run directory: two random
    draws close together would otherwise share one (and the second be skipped as finished)."""
    for digits in range(3, 18):
        names = [run_name(w, p, digits) for p in sweep_points for w in widths]
        if len(set(names)) == len(names):
            return digits
    duplicate = next(n for n in names if names.count(n) > 1)
    raise ConfigError(f"Two points of the sweep are the same run ({duplicate}); list each value once.")


def expand(sweep) -> List[dict]:
    """Every (point, width) as {name, width, params, argv}; each run's config is validated here."""
    train_config = os.path.join(ROOT, sweep.train_config)
    base = load_config(train_config, list(sweep.overrides))
    runs = []
    sweep_points = points(sweep)
    digits = name_digits(sweep_points, sweep.widths)
    for point in sweep_points:
        for width in sweep.widths:
            name = run_name(width, point, digits)
            overrides = (list(sweep.overrides) + width_overrides(base.model, width)
                         + [f"{k}={v}" for k, v in point.items()]
                         + [f"train.run_dir={os.path.join(sweep.out, name)}", "logging.progress_bar=false",
                            "train.resume=auto"])   # a run cut short (or requeued) continues from its checkpoint
            load_config(train_config, overrides)            # fail now, not in the 30th job
            runs.append({"name": name, "width": width, "params": point,
                         "argv": ["launch/train.py", "--config", sweep.train_config] + overrides})
    return runs
