"""The deployment guide's examples stay true: every configuration block is valid mailproc
configuration, and the rule example loads beside the shipped rules."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest

from mailproc.config import parse_settings
from mailproc.rules import RuleSet

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
SHIPPED_RULES = Path(__file__).resolve().parent.parent / "rules"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.DOTALL)


@pytest.mark.parametrize("block", [b for b in blocks("toml") if not b.startswith("# rules/")])
def test_every_configuration_example_is_valid(block: str) -> None:
    parse_settings(tomllib.loads(block), str(GUIDE), env={})


def test_the_rule_example_loads_with_the_shipped_rules(tmp_path: Path) -> None:
    [rule] = [b for b in blocks("toml") if b.startswith("# rules/")]
    folder = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, folder)
    name = rule.splitlines()[0].removeprefix("# rules/").strip()
    (folder / name).write_text(rule)
    names = [r.name for r in RuleSet.load(folder).rules]
    assert "two-factor-help" in names  # the name is the file name without its order prefix
