"""Shared fixtures: real peers (redis-server, DCMTK, dicom3tools) on free loopback ports.

A missing tool skips the test locally, and fails it when ``DICOM_NODE_REQUIRE_TOOLS=1``
(``.ci/run`` sets it), so CI can never go green by skipping the real parts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from tests.support import procs

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

REQUIRE_TOOLS = os.environ.get("DICOM_NODE_REQUIRE_TOOLS") == "1"


def missing_part(msg: str) -> NoReturn:
    """A real part the test needs is missing (``msg`` says which): skip the test, or fail it
    under DICOM_NODE_REQUIRE_TOOLS=1."""
    if REQUIRE_TOOLS:
        pytest.fail(msg + " (DICOM_NODE_REQUIRE_TOOLS=1)")
    pytest.skip(msg)


def require_tool(*names: str) -> None:
    """Skip (or fail under DICOM_NODE_REQUIRE_TOOLS=1) unless every tool is on PATH."""
    missing = [n for n in names if procs.tool_path(n) is None]
    if missing:
        missing_part(f"required tool(s) not installed: {', '.join(missing)}")


def require_orthanc_dicomweb() -> None:
    """Skip (or fail under DICOM_NODE_REQUIRE_TOOLS=1) without Orthanc and its DICOMweb plugin."""
    from tests.support import ohif

    require_tool("Orthanc")
    if ohif.dicomweb_plugin() is None:
        missing_part("the orthanc-dicomweb plugin is not installed")


def require_postgres() -> PostgresServer:
    """A throw-away PostgreSQL server (skip, or fail under DICOM_NODE_REQUIRE_TOOLS=1, without
    one); the caller stops it."""
    from tests.support.postgres import PostgresUnavailable, start_postgres

    try:
        return start_postgres()
    except PostgresUnavailable as exc:
        missing_part(str(exc))


def require_playwright() -> Any:
    """playwright's ``sync_playwright`` (skip, or fail under DICOM_NODE_REQUIRE_TOOLS=1, without it)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_part("the Python package playwright is not installed (pip install playwright)")
    return sync_playwright


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where a test writes the screenshots of docs/images/: tmp_path, or docs/images itself
    under ``DICOM_NODE_UPDATE_SCREENSHOTS=1`` (see :mod:`tests.support.screenshots`)."""
    from tests.support.screenshots import screenshot_dir

    return screenshot_dir(tmp_path)


@pytest.fixture
def tool() -> object:
    """``tool("storescu", "dciodvfy")`` inside a test: require those tools."""
    return require_tool


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[procs.Server]:
    """A real redis-server on a free port; ``.extra["url"]`` is its URL."""
    require_tool("redis-server")
    server = procs.start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def storescp_archive(tmp_path: Path) -> Iterator[procs.Server]:
    """DCMTK storescp acting as the archive (AE ``ARCHIVE``); files land in ``.extra["received"]``."""
    require_tool("storescp")
    server = procs.start_storescp(tmp_path / "archive")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dciodvfy_clean() -> object:
    """``dciodvfy_clean(path)`` asserts that ``dciodvfy -new`` reports no error, returns warnings."""
    require_tool("dciodvfy")

    def check(path: Path | str) -> list[str]:
        errors, warnings, text = procs.dciodvfy(path)
        assert errors == [], f"dciodvfy errors for {path}:\n{text}"
        return warnings

    return check
