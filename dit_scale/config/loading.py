"""Reading a run configuration: schema ← YAML (with `base:` files) ← `key=value` overrides, resolved and checked.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100", "moe.top_k=1"])

A YAML file may name a `base:` file (path relative to itself) whose values it overrides. Unknown keys, wrong types
and invalid values raise `ConfigError` with one sentence naming the field and what is allowed, before any process
group or model exists. The loaded config is resolved (derived values written back, `resolve.py`) and read-only;
`save_config` writes it as the run (and each checkpoint) carries it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from dit_scale.config.resolve import resolve
from dit_scale.config.schema import Config
from dit_scale.config.validate import check_values, validate
from dit_scale.errors import ConfigError


def _read_yaml(path: str, seen: tuple = ()) -> DictConfig:
    """Read a YAML file, recursively merging it over the file its `base:` key names."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}' does not exist; pass an existing YAML file to --config.")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"Config file '{path}' is its own base (cycle through 'base:'); remove the cycle.")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"Config file '{path}' is not valid YAML ({e}).") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (model:, moe:, train:, ...).")
    base = node.pop("base", None)
    if base is None:
        return node
    base_path = os.path.join(os.path.dirname(path), str(base))
    return OmegaConf.merge(_read_yaml(base_path, seen + (os.path.abspath(path),)), node)


def _field_names(schema, section: str) -> List[str]:
    """The keys of `section`, or the top level's when it is not a section."""
    return _sections(schema).get(section) or [f.name for f in dataclasses.fields(schema)]


def _sections(schema) -> dict:
    """{section: its field names} for the schema's fields that are sections (dataclasses)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = [g.name for g in dataclasses.fields(f.default_factory)]
    return out


def _did_you_mean(schema, key: str) -> str:
    """'did you mean ...? ' for an unknown key: the same name in another section (train.lr -> optim.lr), else the
    closest name in its section or the closest section (a typo); '' when nothing is close."""
    section, _, name = key.rpartition(".")
    sections = _sections(schema)
    if not section:
        guesses = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(schema)], n=1)
    elif section in sections:
        guesses = [f"{s}.{name}" for s, names in sections.items() if s != section and name in names]
        guesses = guesses or [f"{section}.{m}" for m in difflib.get_close_matches(name, sections[section], n=1)]
    else:
        guesses = []
    return f"did you mean {' or '.join(repr(g) for g in guesses)}? " if guesses else ""


def _type_label(t) -> str:
    """A schema annotation in words: integer, number, list of numbers, section, ..."""
    if isinstance(t, str):                                  # postponed annotations: the names as written
        t = t.replace("typing.", "")
        inner = t[len("Optional["):-1] if t.startswith("Optional[") else t
        if inner.startswith(("List[", "list[")):
            return "list of " + _type_label(inner[5:-1]).replace("integer", "integers").replace("number", "numbers")
        return {"int": "integer", "float": "number", "bool": "boolean (true/false)", "str": "string"}.get(inner,
                                                                                                         inner)
    if typing.get_origin(t) is typing.Union:
        return _type_label(next(a for a in typing.get_args(t) if a is not type(None)))
    if typing.get_origin(t) is list:
        return "list of " + _type_label(typing.get_args(t)[0]).replace("integer", "integers").replace("number",
                                                                                                      "numbers")
    if dataclasses.is_dataclass(t):
        return "section of key: value settings"
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(t, "value")


def _type_name(schema, full_key: str) -> str:
    section, _, name = str(full_key).partition(".")
    for f in dataclasses.fields(schema):
        if f.name == section:
            if not name or not dataclasses.is_dataclass(f.type) and f.default_factory is dataclasses.MISSING:
                return _type_label(f.type)                  # a top-level field (a sweep file's num_samples)
            for g in dataclasses.fields(f.default_factory()):
                if g.name == name:
                    return _type_label(g.type)
    return "value"


def merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    """OmegaConf.merge of `other` over the structured `base`, with schema errors as one-sentence ConfigErrors
    naming `origin` (a file or an override). Also used for other schemas (e.g. dit_scale/sweep's sweep files)."""
    schema = OmegaConf.get_type(base)
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        section = key.split(".")[0] if "." in key else ""
        allowed = ", ".join(_field_names(schema, section))
        where = f"'{section}'" if section else "the top level"
        raise ConfigError(f"Unknown config key '{key}' in {origin}; {_did_you_mean(schema, key)}allowed keys in "
                          f"{where}: {allowed}.") from None
    except ValidationError as e:
        key = e.full_key or (str(other).split("=")[0] if isinstance(other, str) else None)
        if not key:                                         # a whole section replaced by a value (model=5)
            raise ConfigError(f"A section in {origin} was given a single value; set its keys instead, e.g. "
                              f"model.depth=12.") from None
        raise ConfigError(f"Config field '{key}' in {origin} got {e.value!r}, "
                          f"which is not a valid {_type_name(schema, key)}.") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"Config field '{getattr(e, 'full_key', '?')}' in {origin} is invalid: {e.msg}.") from None
    except TypeError as e:                                  # OmegaConf: a mapping where a list goes, or the reverse
        raise ConfigError(f"A value in {origin} has the wrong shape ({e}): a list field takes [a, b], a section "
                          f"or mapping takes key: value pairs.") from None


def _check_interpolated_keys(cfg: DictConfig) -> None:
    """An interpolation of a key that is still null would resolve to the text 'None' (`runs/k${moe.top_k}` when
    top_k comes from the model's name): derived values are written after interpolations, so such a reference is
    refused, naming both keys."""
    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif isinstance(value, str):
                for ref in re.findall(r"\$\{([A-Za-z_][\w.]*)\}", value):     # plain ${a.b}, not resolvers
                    if OmegaConf.select(cfg, ref, default="missing") is None:
                        raise ConfigError(f"Config field '{path}' interpolates ${{{ref}}}, which is null here (a "
                                          f"value derived later, from the model's name or sizes); set {ref} "
                                          f"explicitly or write the value itself.")
    walk(OmegaConf.to_container(cfg, resolve=False), "")


def _finish(cfg: DictConfig) -> DictConfig:
    """Interpolations resolved, values checked, derived values written back, checked again; read-only."""
    _check_interpolated_keys(cfg)
    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError as e:
        raise ConfigError(f"Config field '{e.full_key}' has an interpolation that cannot be resolved "
                          f"({str(e).splitlines()[0]}); fix the ${{...}} reference.") from None
    check_values(cfg)
    resolve(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema ← YAML (with bases) ← `key=value` overrides, resolved and validated. Returns a read-only DictConfig."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = merge(cfg, _read_yaml(path), f"'{path}'")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value (e.g. train.steps=100).")
        key, value = item.split("=", 1)
        try:
            dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception as e:
            raise ConfigError(f"Override '{item}' could not be parsed ({e}).") from None
        cfg = merge(cfg, dotted, f"override '{item}'")
    return _finish(cfg)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str) -> str:
    """Write the resolved config to `path` (a .yaml file; a directory: its config.yaml), atomically."""
    if not path.endswith((".yaml", ".yml")):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "config.yaml")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):                 # a full disk: leave nothing behind
            os.remove(tmp)
        raise
    return path


def parse_stored_config(text: str, origin: str = "the stored config") -> DictConfig:
    """The YAML text a run directory, checkpoint or export stores, as a mapping of sections; ConfigError naming
    `origin` (e.g. "the config stored in 'model.safetensors'") when it is not one: not YAML or not plain YAML (a tag
    such as !!python/object), a list, or a section that is not a mapping."""
    try:
        node = OmegaConf.create(text)
    except Exception as e:  # yaml syntax errors, tags OmegaConf's safe loader has no constructor for
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"Cannot use {origin}: it is not plain YAML ({reason}), so dit_scale did not write it; use "
                          f"a file that a training run or launch/export.py wrote.") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"Cannot use {origin}: it is a YAML list, not a mapping of sections (model:, train:, ...); "
                          f"use a file that a training run or launch/export.py wrote.")
    for section, value in node.items_ex(resolve=False):
        if not isinstance(value, DictConfig):
            raise ConfigError(f"Cannot use {origin}: its section '{section}' is not a mapping; use a file that a "
                              f"training run or launch/export.py wrote.")
    return node


def config_from_yaml_text(text: str, origin: str = "the stored config") -> DictConfig:
    """Rebuild a validated config from the YAML text stored in a run directory or checkpoint; ConfigError naming
    `origin` (see `parse_stored_config`) when it is not a valid config."""
    return _finish(merge(OmegaConf.structured(Config), parse_stored_config(text, origin), origin))
