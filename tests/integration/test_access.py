"""Who may connect to a real ``dicom-node serve``: logged rejections, DICOM TLS with DCMTK and
certificates made here with openssl, TLS >= 1.2, client certificates, association limits.

``tests/integration/test_listener.py`` already covers the allow-list and called-AE statuses on an
in-process listener; these tests add what an operator sees (the log) and the TLS and load paths.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import NodeProcess, node_config, start_node, wait_until

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"


def log_events(node: NodeProcess, event: str) -> list[dict[str, object]]:
    """The node's JSON log lines whose ``event`` is ``event``."""
    out = []
    for line in node.server.log_text().splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == event:
                out.append(rec)
    return out


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[object]:
    nodes: list[NodeProcess] = []

    def make(name: str = "node", **listener: object) -> NodeProcess:
        workdir = tmp_path / name
        config = node_config(workdir)
        config["listener"].update(listener)
        node = start_node(workdir, config)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def test_rejected_calling_ae_is_logged_with_reason(make_node: object) -> None:
    """An association from a calling AE outside the allow-list is rejected and the node logs
    ``association_rejected`` with the calling AE title and the reason."""
    require_tool("echoscu")
    node = make_node(allowed_calling_ae_titles=["PACS"])  # type: ignore[operator]
    res = procs.run_tool(["echoscu", "-aet", "INTRUDER", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port)])
    assert res.returncode != 0
    ok = procs.run_tool(["echoscu", "-aet", "PACS", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    [rejected] = wait_until(lambda: log_events(node, "association_rejected"), 10, what="rejection logged")
    assert rejected["calling_ae_title"] == "INTRUDER"
    assert rejected["reason"] == "calling AE title not recognized"
    assert rejected["level"] == "warning"


# -- TLS ------------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    procs.run_tool(["openssl", *args], check=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    files = {k: d / f"{k}.pem" for k in ("ca", "ca_key", "server", "server_key", "client", "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files["ca_key"]), "-out",
             str(files["ca"]), "-days", "1", "-subj", "/CN=dicom-node test CA")
    for who, subject, ext in (("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                              ("client", "/CN=PACS", "extendedKeyUsage=clientAuth")):
        csr = d / f"{who}.csr"
        extfile = d / f"{who}.ext"
        extfile.write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files[f"{who}_key"]), "-out", str(csr),
                 "-subj", subject)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey", str(files["ca_key"]),
                 "-CAcreateserial", "-out", str(files[who]), "-days", "1", "-extfile", str(extfile))
    return files


@pytest.fixture
def tls_node(make_node: object, pki: dict[str, Path]) -> NodeProcess:
    """A node speaking DICOM TLS only, requiring a client certificate signed by the test CA."""
    return make_node(tls={"certificate": str(pki["server"]), "private_key": str(pki["server_key"]),  # type: ignore[operator, no-any-return]
                          "ca_certificates": str(pki["ca"]), "require_client_certificate": True})


def _series(tmp: Path) -> list[Path]:
    phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=4))
    return write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="tls")), tmp / "tls")


def test_dcmtk_storescu_over_tls_with_client_certificate_stores(tls_node: NodeProcess, pki: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """DCMTK ``storescu +tls`` with a client key and certificate stores a series over TLS."""
    require_tool("storescu")
    files = _series(tmp_path)
    res = procs.run_tool(["storescu", "-aec", "DICOM_NODE", "+tls", str(pki["client_key"]), str(pki["client"]),
                          "+cf", str(pki["ca"]), procs.LOOPBACK, str(tls_node.port), *map(str, files)], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    spool = tls_node.config_path.parent / "spool"
    wait_until(lambda: len(list(spool.rglob("*.dcm"))) == len(files), 10, what="spool files")


def test_tls_client_without_certificate_is_refused(tls_node: NodeProcess, pki: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """An anonymous TLS client (``storescu +tla``) and a plain TCP client store nothing; the
    failed handshake is logged and the node keeps serving TLS clients."""
    require_tool("storescu", "echoscu")
    files = _series(tmp_path)
    anon = procs.run_tool(["storescu", "-aec", "DICOM_NODE", "+tla", "+cf", str(pki["ca"]), procs.LOOPBACK,
                           str(tls_node.port), *map(str, files)], timeout=60)
    assert anon.returncode != 0
    plain = procs.run_tool(["echoscu", "-to", "5", "-aec", "DICOM_NODE", procs.LOOPBACK, str(tls_node.port)],
                           timeout=30)
    assert plain.returncode != 0
    assert list((tls_node.config_path.parent / "spool").rglob("*.dcm")) == []
    failures = wait_until(lambda: log_events(tls_node, "tls_handshake_failed"), 10, what="handshake failure logged")
    assert any("certificate" in str(f["error"]).lower() for f in failures), failures
    ok = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", "+tls", str(pki["client_key"]), str(pki["client"]),
                         "+cf", str(pki["ca"]), procs.LOOPBACK, str(tls_node.port)], timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_tls_1_1_client_is_refused(tls_node: NodeProcess, pki: dict[str, Path]) -> None:
    """A client offering at most TLS 1.1 (with a valid certificate) fails the handshake: the
    server answers with a protocol-version alert; TLS 1.2 from the same client works."""
    def handshake(version: ssl.TLSVersion) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # old versions on purpose
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = version
        ctx.load_verify_locations(cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        with socket.create_connection((procs.LOOPBACK, tls_node.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"

    with pytest.raises(ssl.SSLError, match=r"(?i)alert protocol version"):
        handshake(ssl.TLSVersion.TLSv1_1)
    handshake(ssl.TLSVersion.TLSv1_2)


# -- association limits ---------------------------------------------------------------------------


def test_association_beyond_the_limit_is_rejected_with_local_limit_exceeded(make_node: object) -> None:
    """With ``max_associations = 2`` and two associations open, a third is rejected (transient,
    local limit exceeded); once one is released a new one is accepted."""
    require_tool("echoscu")
    node = make_node(max_associations=2)  # type: ignore[operator]
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(VERIFICATION)
    held = [ae.associate(procs.LOOPBACK, node.port, ae_title="DICOM_NODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        res = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port)], timeout=30)
        text = (res.stdout + res.stderr).lower()
        assert res.returncode != 0
        assert "rejected transient" in text and "local limit exceeded" in text, text
        rejected = wait_until(lambda: log_events(node, "association_rejected"), 10, what="rejection logged")
        assert rejected[0]["reason"] == "local limit exceeded (too many associations)"
    finally:
        held[0].release()
    ok = wait_until(lambda: procs.run_tool(["echoscu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port)],
                                           timeout=30).returncode == 0, 10, what="association accepted again")
    assert ok
    held[1].release()


@pytest.mark.slow
def test_eight_parallel_senders_all_stored(make_node: object, tmp_path: Path) -> None:
    """Eight DCMTK storescu processes sending 200 instances each at once: all 1,600 instances are
    acknowledged, spooled and catalogued."""
    require_tool("storescu")
    node = make_node(max_associations=16)  # type: ignore[operator]
    senders, per = 8, 200
    batches = []
    for i in range(senders):
        phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=per))
        batches.append(write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=f"par-{i}")),
                                      tmp_path / f"s{i}"))
    procs_ = [subprocess.Popen(["storescu", "-aet", f"MOD{i}", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port),
                                *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=procs.dcmtk_env(True))
              for i, files in enumerate(batches)]
    outputs = [p.communicate(timeout=180)[0] for p in procs_]
    assert all(p.returncode == 0 for p in procs_), outputs
    assert not any("Store Failed" in o for o in outputs)
    spool = node.config_path.parent / "spool"
    wait_until(lambda: sum(1 for _ in spool.rglob("*.dcm")) == senders * per, 30, what="spool files")
    catalog = Catalog(f"sqlite:///{node.config_path.parent / 'node.db'}")
    wait_until(lambda: sum(s.instance_count for s in catalog.list_series()) == senders * per, 30,
               what="every instance catalogued")
    assert len(catalog.list_series()) == senders
