"""Shared fixtures and helpers for the whole suite."""

from __future__ import annotations

import os

import pytest


def require_tool(available: bool, what: str) -> None:
    """Skip when an external program is missing, except in CI, where that is a failure."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} is not available")
