"""Shared fixtures. PostgreSQL tests skip with a reason when the server is unreachable, but fail under CI=true."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_URL = os.environ.get("GRADLEDGER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _pg_admin_url() -> str:
    return PG_URL.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL for a fresh, empty PostgreSQL schema (dropped afterwards)."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - dev extra installs it
        if _in_ci():
            pytest.fail(f"psycopg missing under CI=true: {exc}")
        pytest.skip(f"psycopg not installed: {exc}")
    try:
        admin = psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3)
    except Exception as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL at {PG_URL} unreachable under CI=true: {exc}")
        pytest.skip(f"PostgreSQL at {PG_URL} unreachable: {exc}")
    schema = f"gl_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()
