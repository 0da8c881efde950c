"""The config reference (docs/config.md), generated from the schema: every key with its type, default, allowed values
and the one-line meaning written beside it in `schema.py`, so the page cannot drift from the code
(tests/unit/test_config_reference.py fails when docs/config.md is out of date).

    python -m dit_scale.config.reference > docs/config.md
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from dit_scale.config import schema

HEADER = """# Config reference

Every key of a run's config, by section: its type, default, allowed values and meaning. Generated from
`dit_scale/config/schema.py` by `python -m dit_scale.config.reference > docs/config.md` (a test fails when this page
is out of date). Set a key in a YAML file (`configs/`, `base: other.yaml` to build on another) or on the command line
(`key=value`); keys marked *derived* are filled in when the config is loaded and may only be given when they agree.
"""


def field_comments(cls) -> dict:
    """{field name: its comment in the schema source}, continuation comment lines joined."""
    comments, current = {}, None
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if match and not line.strip().startswith("#"):
            current = match.group(1)
            comments[current] = (match.group(2) or "").strip()
        elif current and re.match(r"\s+#", line):
            comments[current] = (comments[current] + " " + line.strip().lstrip("#").strip()).strip()
        else:
            current = None
    return comments


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(tp) in (list, typing.List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    value = f.default
    return "`null`" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    """The markdown page: one table per section of `schema.Config`."""
    out = [HEADER]
    for section in dataclasses.fields(schema.Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls, vars(schema))
        comments = field_comments(cls)
        out += [f"\n## `{section.name}`\n", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            meaning = comments.get(f.name, "")
            if key in schema.CHOICES:
                meaning += (" " if meaning else "") + "Allowed: " + ", ".join(f"`{c}`" for c in schema.CHOICES[key]) + "."
            out.append(f"| `{key}` | {_type_name(hints[f.name])} | {_default(f)} | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
