"""Shared fixtures: unique names for everything a test creates."""

from __future__ import annotations

import os
import secrets

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def uniq() -> str:
    """A short unique prefix ("t" + 5 hex chars) for namespaces, veths, cgroups, tables."""
    return "t" + secrets.token_hex(3)[:5]


@pytest.fixture
def need_root() -> None:
    """Integration tests need root; in CI (as root) this never fails, elsewhere it says why."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: run it through `sudo scripts/test`")
