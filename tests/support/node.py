"""Run real ``dicom-node serve`` / ``dicom-node worker`` processes for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import LOOPBACK, Server, free_port, stop_process, wait_for_port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a (small) nested dict as TOML: tables, and arrays of tables for lists of dicts."""
    lines: list[str] = []
    for section, body in config.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
            lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def node_config(
    workdir: Path, *, port: int | None = None, broker_url: str | None = None,
    destinations: Sequence[dict[str, Any]] = (), rules: Sequence[dict[str, Any]] = (),
    idle_seconds: float = 1.0, **sections: dict[str, Any],
) -> dict[str, Any]:
    """A config for a test node living entirely inside ``workdir``."""
    config: dict[str, Any] = {
        "listener": {"ae_title": "DICOM_NODE", "host": LOOPBACK, "port": port or free_port()},
        "storage": {"root": str(workdir / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{workdir / 'node.db'}"},
        "broker": {"url": broker_url or f"sqla+sqlite:///{workdir / 'broker.db'}"},
        "web": {"enabled": False},
        "completion": {"idle_seconds": idle_seconds, "poll_seconds": 0.1},
        "delivery": {"max_attempts": 1, "backoff_seconds": 0.5},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    if destinations:
        config["destinations"] = list(destinations)
    if rules:
        config["rules"] = list(rules)
    return config


@dataclass
class NodeProcess:
    """A running ``dicom-node serve`` (plus separately started workers)."""

    server: Server
    config_path: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def logs(self) -> str:
        text = self.server.log_text()
        for log in sorted(self.config_path.parent.glob("worker-*.log")):
            text += f"\n--- {log.name}\n" + log.read_text(errors="replace")
        return text

    def start_worker(self, name: str = "w1", extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.config_path.parent / f"worker-{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "worker", "--config", str(self.config_path),
                 "--hostname", f"{name}@%h", "--log-format", "json"],
                stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})},
            )
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.workers:
            stop_process(proc)
        self.server.stop()


def start_node(
    workdir: Path, config: dict[str, Any], *, extra_env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> NodeProcess:
    """Write ``config`` and start ``dicom-node serve`` on it; return once it listens.

    ``preexec_fn`` runs in the child before ``serve`` starts (e.g. to lower its fd limit).
    """
    config_path = write_config(workdir / "dicom-node.toml", config)
    log = workdir / "node.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(config_path), "--log-format", "json"],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})}, cwd=workdir,
            preexec_fn=preexec_fn,
        )
    port = int(config["listener"]["port"])
    try:
        wait_for_port(port, timeout=60, proc=proc)
    except Exception:
        stop_process(proc)
        raise RuntimeError(f"node did not start:\n{log.read_text(errors='replace')}") from None
    return NodeProcess(Server(proc, port, workdir, log), config_path)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
