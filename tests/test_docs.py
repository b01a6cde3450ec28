"""The docs stay true: every setting documented, every cited test exists."""

from __future__ import annotations

import re

import pytest

from ghostcloak_relay.config import OPTIONS

from .conftest import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.env)
def test_every_setting_is_in_the_readme_table(option: object) -> None:
    readme = (ROOT / "README.md").read_text()
    env, flag = option.env, option.flag  # type: ignore[attr-defined]
    assert re.search(rf"\| `{env}` \| `{flag}` \|", readme), f"{env} missing from README"


def test_every_relay_variable_in_the_code_is_documented() -> None:
    code = " ".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    docs = " ".join(p.read_text() for p in DOCS)
    used = set(re.findall(r"[\"'](RELAY_[A-Z0-9_]+)[\"'=]", code))  # variable names in strings
    assert "RELAY_TLS_CERT" in used
    assert sorted(used - set(re.findall(r"RELAY_[A-Z0-9_]+", docs))) == []


def test_every_test_cited_in_the_docs_exists() -> None:
    cited = set()
    for doc in DOCS:
        cited |= set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", doc.read_text()))
    assert cited, "the docs cite tests"
    for path, name in sorted(cited):
        source = (ROOT / path).read_text()
        assert re.search(rf"def {name}\(", source), f"{path}::{name} cited but not found"
