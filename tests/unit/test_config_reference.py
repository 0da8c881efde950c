"""docs/config.md is the schema's reference, generated (dit_scale/config/reference.py): this fails when a key, default
or comment changed without regenerating it, and checks the page against the schema directly."""
import dataclasses
import os

from dit_scale.config import schema
from dit_scale.config.reference import config_reference, field_comments
from tiny import ROOT

PAGE = os.path.join(ROOT, "docs", "config.md")


def test_config_reference_is_up_to_date():
    with open(PAGE) as f:
        on_disk = f.read()
    assert on_disk == config_reference(), \
        "docs/config.md is out of date: run `python -m dit_scale.config.reference > docs/config.md`"


def test_every_key_is_listed_once_with_its_default_and_a_meaning():
    text = config_reference()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    keys = [f"{s.name}.{f.name}" for s in dataclasses.fields(schema.Config)
            for f in dataclasses.fields(s.default_factory)]
    assert [row.split("`")[1] for row in rows] == keys
    assert all(row.rstrip().split("|")[-2].strip() for row in rows), "a key without a meaning"
    assert "| `train.compile_mode` | str | `default` |" in text and "`reduce-overhead`" in text
    assert "| `mask.unmask_at_step` | int or null | `null` |" in text
    assert field_comments(schema.MaskConfig)["scale_batch"].startswith("token budget:")
