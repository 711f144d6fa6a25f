"""The documents a hospital reads are executed, so they cannot drift from the code.

Conventions for fenced blocks in ``README.md``, ``docs/*.md`` and ``docker/README.md`` (the
words after the language are ignored by Markdown renderers):

- ```` ```toml test ```` is loaded with :func:`dicom_node.settings.load_settings`;
  ```` ```toml test-fragment ```` is first merged into the shipped ``config/dicom-node.toml``
  (tables key by key, ``[[arrays]]`` appended).  ``file=NAME`` also writes the (merged) file into
  the document's work folder for later blocks.
- ```` ```toml test-card ```` is a model card, read with ``inference.user_models.read_card``;
  ```` ```toml test-pyproject ```` a plugin's ``pyproject.toml`` declaring model entry points.
- ```` ```json test-orthanc ```` is an Orthanc configuration that must list the shipped node
  (AE title and port) in ``DicomModalities``.
- ```` ```sh test ```` runs in the document's work folder, where ``config/dicom-node.toml`` is the
  shipped configuration and ``.venv`` the repository's virtualenv, with this venv's ``python``
  and ``dicom-node`` first on PATH (not its whole ``bin``: pynetdicom puts its own ``echoscu``,
  ``storescu`` and ``storescp`` there, which would shadow DCMTK's); options: ``expect="TEXT"`` (in the
  output), ``status=N`` (exit status, default 0), ``until="TEXT"`` (re-run until the output has
  it), ``node`` (needs a running node: one is started from that configuration).
  ```` ```sh test-background port=P ```` starts a server and waits until port ``P`` listens.
  The ports 11112, 4242 and 8080 of the shipped configuration are replaced by free ones in the
  commands and in the work folder's configuration.
- ```` ```python test ```` is executed (blocks of one document share a namespace and folder).
- Any other block must follow a one-line ``<!-- not tested: reason -->`` comment.

Besides: relative links resolve, every ``dicom-node <subcommand>`` exists, every key of the
admin guide exists in ``Settings`` (with the documented default), and the conformance
statement's SOP class, transfer syntax, status and implementation tables match the code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dicom_node.settings import Settings, load_settings
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import NodeProcess, start_node, write_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md"])
SHIPPED_CONFIG = ROOT / "config" / "dicom-node.toml"
BIN = Path(sys.executable).parent
#: Ports of the shipped configuration that commands name; each document gets free ones instead.
SHIPPED_PORTS = (11112, 4242, 8080)
TEST_TAGS = frozenset({"test", "test-fragment", "test-card", "test-pyproject", "test-orthanc", "test-background"})
#: Documents owned by others whose untested blocks still lack the ``not tested`` comment.  The
#: check runs as a strict xfail: once a file is annotated it passes and must leave this list.
PENDING_ANNOTATION: dict[str, str] = {}
NOT_TESTED = re.compile(r"^<!-- not tested: \S.*-->$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


@dataclass
class Block:
    """One fenced block of a document."""

    path: Path
    line: int
    lang: str
    tags: frozenset[str]
    options: dict[str, str]
    text: str
    preceding: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its info string split into language, tags, options."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group("fence")
        words = shlex.split(m.group("info").strip())
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        previous = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        tags = frozenset(w for w in words[1:] if "=" not in w)
        options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        blocks.append(Block(path, start + 1, words[0] if words else "", tags, options, "\n".join(body) + "\n",
                            previous))
    return blocks


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- structure: every block tested or explained, links, subcommands ------------------------------------

def _annotation_params() -> list[Any]:
    params = []
    for path in DOCS:
        rel = doc_id(path)
        marks = [pytest.mark.xfail(strict=True, reason=PENDING_ANNOTATION[rel])] if rel in PENDING_ANNOTATION else []
        params.append(pytest.param(path, id=rel, marks=marks))
    return params


@pytest.mark.parametrize("path", _annotation_params())
def test_every_block_is_tested_or_says_why_not(path: Path) -> None:
    """Each fenced block carries a test tag or follows a one-line `<!-- not tested: reason -->`."""
    bad = [f"{b.where} ({b.lang or 'no language'})" for b in parse_blocks(path)
           if not (b.tags & TEST_TAGS) and not NOT_TESTED.match(b.preceding)]
    assert bad == [], f"blocks without a test tag or a '<!-- not tested: reason -->' line: {bad}"


LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_relative_links_point_to_existing_files(path: Path) -> None:
    """Every relative Markdown link of the document resolves to a file or folder of the repository."""
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert broken == [], f"{doc_id(path)} links to missing files: {broken}"


def _code_texts(path: Path) -> list[str]:
    """Inline code spans plus the shell blocks of a document (diagrams are not commands)."""
    text = path.read_text(encoding="utf-8")
    shell = [b.text for b in parse_blocks(path) if b.lang in ("sh", "bash", "shell", "console")]
    without_blocks = re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", without_blocks) + shell


def _subcommands() -> dict[str, set[str]]:
    """Top-level subcommands of the CLI, each with its own subcommands (empty when none)."""
    import argparse

    from dicom_node.cli import build_parser

    def choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: set(choices(sub)) for name, sub in choices(build_parser()).items()}


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_documented_subcommands_exist(path: Path) -> None:
    """Every `dicom-node <subcommand>` in the document's code is a subcommand of `dicom_node.cli`."""
    commands = _subcommands()
    unknown = []
    for code in _code_texts(path):
        for m in re.finditer(r"(?<![\w/.-])dicom-node[ \t]+([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*))?", code):
            first, second = m.group(1), m.group(2)
            if first not in commands:
                unknown.append(m.group(0))
            elif commands[first] and second not in commands[first]:
                unknown.append(m.group(0))
    assert unknown == [], f"{doc_id(path)} names commands the CLI does not have: {unknown}"


# -- the admin guide's keys against Settings ------------------------------------------------------------

def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def settings_keys() -> dict[tuple[str, str], Any]:
    """(section, key) -> field info for every configuration key (sections like `listener.tls`)."""
    out: dict[tuple[str, str], Any] = {}

    def walk(model: type[BaseModel], section: str) -> None:
        for name, info in model.model_fields.items():
            sub = _model_of(info.annotation)
            if section:
                out[(section, name)] = info
            if sub is not None:
                walk(sub, f"{section}.{name}" if section else name)

    walk(Settings, "")
    return out


KEY_REF = re.compile(r"`\[\[?([a-z_.]+)\]\]? ([a-z_]+)`")


def test_admin_guide_keys_exist_in_settings() -> None:
    """Every `[section] key` the admin guide names is a key of `Settings`."""
    keys = settings_keys()
    text = (ROOT / "docs" / "admin-guide.md").read_text(encoding="utf-8")
    named = set(KEY_REF.findall(text))
    for m in re.finditer(r"`\[\[?([a-z_.]+)\]\]? ([a-z_]+), ([a-z_]+)(?:, ([a-z_]+))?`", text):
        named |= {(m.group(1), k) for k in m.groups()[1:] if k}
    assert len(named) > 50
    unknown = sorted(f"[{s}] {k}" for s, k in named if (s, k) not in keys)
    assert unknown == [], f"admin-guide.md names keys Settings does not have: {unknown}"


def _default(info: Any) -> Any:
    if info.default is PydanticUndefined:
        return info.default_factory() if info.default_factory is not None else "required"
    value = info.default
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return "unset" if value is None else value


def test_admin_guide_reference_table_lists_every_key_with_its_default() -> None:
    """The reference table has one row per `Settings` key and each documented default is the code's."""
    text = (ROOT / "docs" / "admin-guide.md").read_text(encoding="utf-8")
    table = text.split("## Reference: every key and its default", 1)[1]
    rows = re.findall(r"^\| `\[\[?([a-z_.]+)\]\]? ([a-z_]+)` \| ([^|]+) \|", table, flags=re.M)
    keys = settings_keys()
    documented = {(s, k): cell.strip() for s, k, cell in rows}
    assert sorted(documented) == sorted(keys), "reference table rows differ from the Settings keys"
    wrong = []
    for key, cell in documented.items():
        expected = _default(keys[key])
        if cell.startswith("*"):
            got: Any = cell.strip("*")
        else:
            got = tomllib.loads(f"v = {cell.strip('`')}")["v"]
        if got != expected:
            wrong.append(f"[{key[0]}] {key[1]}: documented {cell}, code {expected!r}")
    assert wrong == [], "documented defaults differ from the code: " + "; ".join(wrong)


# -- executing the blocks -----------------------------------------------------------------------------

def _merge(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list):
            base[key] = base[key] + value
        else:
            base[key] = value
    return base


@dataclass
class Workspace:
    """A document's work folder: shipped config with free ports, shared Python namespace, servers."""

    root: Path
    ports: dict[int, int]
    namespace: dict[str, Any] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    node: NodeProcess | None = None

    def substitute(self, text: str) -> str:
        for shipped, free in self.ports.items():
            text = re.sub(rf"(?<![\d.]){shipped}(?![\d.])", str(free), text)
        return text

    def config(self) -> dict[str, Any]:
        """The shipped configuration with this workspace's ports, quick completion, no disk watermark."""
        config = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
        config["listener"]["port"] = self.ports[11112]
        config["web"]["port"] = self.ports[8080]
        for dest in config.get("destinations", []):
            if dest["port"] == 4242:
                dest["port"] = self.ports[4242]
        # The shipped paths are under ~: here the workspace is HOME (see env()), spelled out for
        # the node this test starts itself.
        data = self.root / ".local" / "share" / "dicom-node"
        config.setdefault("storage", {}).update({"min_free_mb": 0, "root": str(data / "spool")})
        config["database"]["url"] = f"sqlite:///{data / 'dicom-node.db'}"
        config["broker"]["url"] = f"sqla+sqlite:///{data / 'broker.db'}"
        config["completion"].update({"idle_seconds": 1, "poll_seconds": 0.1})
        config["delivery"] = {"max_attempts": 3, "backoff_seconds": 0.5}
        return config

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env["PATH"] = f"{self.root / '.shim'}{os.pathsep}{env.get('PATH', '')}"
        env["HOME"] = str(self.root)  # the documents' ~/dicom-node-demo lands in the workspace
        return env

    def prepare(self) -> None:
        """Shipped config with free ports, ``.venv`` -> the virtualenv, ``python``/``dicom-node`` shims."""
        write_config(self.root / "config" / "dicom-node.toml", self.config())
        (self.root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        shim = self.root / ".shim"
        shim.mkdir()
        for name, target in (("python", Path(sys.executable)), ("dicom-node", BIN / "dicom-node")):
            (shim / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
            (shim / name).chmod(0o755)

    def ensure_node(self) -> None:
        if self.node is None:
            self.node = start_node(self.root / "config", self.config())

    def stop(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        if self.node is not None:
            self.node.stop()


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    ws = Workspace(tmp_path, {p: procs.free_port() for p in SHIPPED_PORTS})
    ws.prepare()
    try:
        yield ws
    finally:
        ws.stop()


def _tools_of(command: str) -> list[str]:
    return [t for t in ("echoscu", "storescu", "storescp", "dsrdump", "dcmdump", "curl", "openssl")
            if re.search(rf"(?<![\w-]){t}(?![\w-])", command)]


def run_block(block: Block, ws: Workspace) -> None:
    """Execute one tagged block in ``ws``; fail with the block's location and output."""
    if block.lang == "toml" and block.tags & {"test", "test-fragment"}:
        data = tomllib.loads(ws.substitute(block.text))
        if "test-fragment" in block.tags:
            data = _merge(tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8")), data)
        target = ws.root / block.options.get("file", f"block-{block.line}.toml")
        write_config(target, data)
        load_settings(target)  # raises ConfigError naming the key
    elif block.lang == "toml" and "test-card" in block.tags:
        from inference.user_models import read_card

        target = ws.root / block.options.get("file", f"card-{block.line}/model.toml")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text, encoding="utf-8")
        read_card(target)
    elif block.lang == "toml" and "test-pyproject" in block.tags:
        from inference.user_models import ENTRY_POINT_GROUP

        group = tomllib.loads(block.text)["project"]["entry-points"][ENTRY_POINT_GROUP]
        assert group and all(re.fullmatch(r"[\w.]+:[\w.]+", v) for v in group.values()), block.where
    elif block.lang == "json" and "test-orthanc" in block.tags:
        shipped = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))["listener"]
        modalities = json.loads(block.text)["DicomModalities"]
        entries = [m if isinstance(m, dict) else {"AET": m[0], "Host": m[1], "Port": m[2]} for m in modalities.values()]
        assert any(e["AET"] == shipped["ae_title"] and int(e["Port"]) == shipped["port"] for e in entries), (
            f"{block.where}: no DicomModalities entry for {shipped['ae_title']} port {shipped['port']}")
    elif block.lang == "python" and "test" in block.tags:
        cwd = Path.cwd()
        os.chdir(ws.root)
        try:
            with warnings.catch_warnings():
                # torch deprecates TorchScript; the node still loads it (see inference.user_models).
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
                exec(compile(block.text, block.where, "exec"), ws.namespace)  # noqa: S102 - the docs' own examples
        finally:
            os.chdir(cwd)
    elif block.lang == "sh" and "test-background" in block.tags:
        for tool in _tools_of(block.text):
            require_tool(tool)
        command = ws.substitute(block.text)
        log = (ws.root / f"background-{block.line}.log").open("wb")
        proc = subprocess.Popen(["bash", "-c", command], cwd=ws.root, env=ws.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        ws.servers.append(proc)
        procs.wait_for_port(ws.ports.get(int(block.options["port"]), int(block.options["port"])), proc=proc)
    elif block.lang == "sh" and "test" in block.tags:
        for tool in _tools_of(block.text):
            require_tool(tool)
        if "node" in block.tags or re.search(r"\b(echoscu|storescu)\b|127\.0\.0\.1:8080", block.text):
            ws.ensure_node()
        command = ws.substitute(block.text)
        expect = ws.substitute(block.options.get("expect", block.options.get("until", "")))
        deadline = time.monotonic() + (90 if "until" in block.options else 0)
        while True:
            res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=ws.root, env=ws.env(),
                                 capture_output=True, text=True, timeout=120)
            output = res.stdout + res.stderr
            ok = res.returncode == int(block.options.get("status", 0)) and expect in output
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        logs = ws.node.logs()[-4000:] if ws.node is not None and not ok else ""
        assert res.returncode == int(block.options.get("status", 0)), (
            f"{block.where}: `{command.strip()}` exited {res.returncode}:\n{output}\n{logs}")
        assert expect in output, f"{block.where}: `{command.strip()}` output lacks {expect!r}:\n{output}\n{logs}"


EXECUTED_DOCS = [p for p in DOCS if any(b.tags & TEST_TAGS for b in parse_blocks(p))]


@pytest.mark.parametrize("path", EXECUTED_DOCS, ids=doc_id)
def test_document_blocks_run(path: Path, workspace: Workspace) -> None:
    """Every tagged block of the document runs, in order, and does what it says."""
    blocks = [b for b in parse_blocks(path) if b.tags & TEST_TAGS]
    assert blocks
    for block in blocks:
        run_block(block, workspace)
    if doc_id(path) == "docs/quickstart.md":
        # The quickstart promises a SEG and an SR in the archive, plus the GSPS, KOS and secondary
        # captures of the default outputs: check the files storescp wrote.
        import pydicom

        classes = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                         for p in (workspace.root / "dicom-node-demo" / "received").iterdir())
        sc = "1.2.840.10008.5.1.4.1.1.7"
        assert [c for c in classes if c != sc] == [
            "1.2.840.10008.5.1.4.1.1.11.1",  # GSPS
            "1.2.840.10008.5.1.4.1.1.66.4",  # SEG
            "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
            "1.2.840.10008.5.1.4.1.1.88.59",  # KOS
        ], classes
        assert 1 <= classes.count(sc) <= 4, classes


# -- the conformance statement against the code ---------------------------------------------------

CONFORMANCE = ROOT / "docs" / "conformance-statement.md"


def _section(text: str, start: str, end: str | None = None) -> str:
    part = text.split(start, 1)[1]
    return part.split(end, 1)[0] if end else part


def test_conformance_lists_exactly_the_storage_sop_classes_the_listener_accepts() -> None:
    """Annex C names every storage SOP class of pynetdicom's `AllStoragePresentationContexts`, and no other."""
    from pydicom.uid import UID
    from pynetdicom import AllStoragePresentationContexts

    text = CONFORMANCE.read_text(encoding="utf-8")
    annex = _section(text, "### Annex C: Storage SOP Classes accepted")
    rows = re.findall(r"^\| (.+?) \| `([\d.]+)` \|$", annex, flags=re.M)
    expected = [(UID(cx.abstract_syntax).name, str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts]
    assert rows == expected
    assert f"({len(expected)} classes)" in text and f"The {len(expected)} Storage SOP Classes" in text


def test_conformance_transfer_syntaxes_match_the_listener() -> None:
    """The storage transfer syntaxes are the listener's, in its order of preference; Verification the first three."""
    from pydicom.uid import UID

    from dicom_node.ingest.listener import TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS

    text = CONFORMANCE.read_text(encoding="utf-8")
    table = _section(text, "| Transfer Syntax (storage) | UID |", "\n\n")
    rows = re.findall(r"^\| (.+?) \| `([\d.]+)` \|$", table, flags=re.M)
    assert rows == [(UID(t).name, t) for t in TRANSFER_SYNTAXES]
    verification = ", ".join(UID(t).name for t in TRANSFER_SYNTAXES[:3])
    assert f"| Verification `{VERIFICATION_SOP_CLASS}` | {verification} | SCP | None |" in text


def test_conformance_scu_contexts_match_the_sender() -> None:
    """The SCU proposes Explicit VR Little Endian for the results and pynetdicom's defaults for C-ECHO."""
    from pydicom.uid import UID
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

    from dicom_node.results.common import ResultOptions

    text = CONFORMANCE.read_text(encoding="utf-8")
    assert UID(ResultOptions().seg_transfer_syntax).name == "Explicit VR Little Endian"
    echo = ", ".join(UID(t).name for t in DEFAULT_TRANSFER_SYNTAXES)
    assert f"| Verification | {echo} | SCU | None |" in text


def test_conformance_implementation_identifiers_match_the_code() -> None:
    """The Implementation Class UID and Version Name sent on the network, and those of spooled files, are the code's."""
    from dicom_node._compat.pynetdicom import TunedAE
    from dicom_node.ingest.listener import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


    text = CONFORMANCE.read_text(encoding="utf-8")
    ae = TunedAE(ae_title="DICOM_NODE")
    assert f"| Implementation Class UID (A-ASSOCIATE) | `{ae.implementation_class_uid}` |" in text
    assert f"| Implementation Version Name (A-ASSOCIATE) | `{ae.implementation_version_name}` |" in text
    assert f"Implementation Class UID `{IMPLEMENTATION_CLASS_UID}`" in text
    assert f"Name `{IMPLEMENTATION_VERSION_NAME}`" in text


def test_conformance_scp_status_codes_are_those_the_listener_returns() -> None:
    """The C-STORE SCP status table lists exactly the status constants `dicom_node.ingest.listener` answers with."""
    from dicom_node import statuses

    source = (ROOT / "dicom_node" / "ingest" / "listener.py").read_text(encoding="utf-8")
    used = {getattr(statuses, name) for name in re.findall(r"statuses\.([A-Z_]+)\b", source)}
    text = CONFORMANCE.read_text(encoding="utf-8")
    table = _section(text, '<a id="c-store-scp-status-codes"></a>', "No warning statuses")
    documented = {int(code, 16) for code in re.findall(r"\| `0x([0-9A-F]{4})` \|", table)}
    assert documented == used


def test_conformance_annex_b_covers_every_built_in_model_and_its_limits() -> None:
    """Annex B has one row per built-in model with its version, modalities and the refusal thresholds in its code."""
    from inference.models import ct_tissue, foreground, lung_nodules
    from inference.registry import builtin_factories

    text = CONFORMANCE.read_text(encoding="utf-8")
    annex = _section(text, "### Annex B: Built-in models", "### Annex C")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)` \|.*$", annex, flags=re.M)}
    assert sorted(rows) == sorted(builtin_factories())
    for name, factory in builtin_factories().items():
        model = factory.__new__(factory)  # type: ignore[operator]  # class attributes only, no device needed
        assert f"| `{name}` | {model.version} | {', '.join(sorted(model.modalities)) or 'any'} |" in rows[name]
    ct = rows["ct-tissue"]
    assert f"at least {ct_tissue.MIN_SLICES} slices of at least {ct_tissue.MIN_PIXELS} x {ct_tissue.MIN_PIXELS}" in ct
    assert f"{ct_tissue.MIN_BODY_ML:g} ml" in ct and f"{ct_tissue.BODY_MIN_HU:g} HU" in ct
    nod = rows["ct-lung-nodules"]
    assert f"{lung_nodules._MIN_CHEST_WIDTH_MM:g} mm wide" in nod and f"{lung_nodules._MIN_CHEST_LENGTH_MM:g} mm" in nod
    assert f"{lung_nodules._MIN_LUNG_ML:g} ml" in nod and f"≥ {lung_nodules.REPORT_THRESHOLD:g}" in nod
    assert f"{lung_nodules.MIN_DIAMETER_MM:g}-{lung_nodules.MAX_DIAMETER_MM:g} mm" in nod
    assert f"at least {foreground.MIN_PIXELS} x {foreground.MIN_PIXELS}" in rows["foreground"]
