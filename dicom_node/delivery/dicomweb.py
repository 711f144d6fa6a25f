"""The ``dicomweb`` target: results sent with STOW-RS (PS3.18 10.5) through ``dicomweb-client``.

Credentials come from the environment or a file named in the settings, never from the TOML
itself, and never appear in a message.  TLS certificates are verified by default (against
``ca_bundle`` when given).  The STOW-RS response is read per instance: an instance in the
Failed SOP Sequence fails the delivery, one with a Warning Reason is accepted with that warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
import structlog
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.delivery.report import InstanceResult, Overwrite, SendReport, compare_stamps, read_stamp
from dicom_node.errors import ConfigError, PermanentError, TransientError
from dicom_node.settings import DestinationSettings

log = structlog.get_logger(__name__)

#: InstanceCreationDate and InstanceCreationTime (``report.CREATION_STAMP``) and SOP Instance UID,
#: as DICOM JSON names them.
_STAMP_TAGS = ("00080012", "00080013")
_SOP_INSTANCE_UID = "00080018"
#: HTTP answers that a later attempt may get past (busy, restarting, a proxy in between).
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def _secret(env: str | None, file: Path | None, what: str, dest: DestinationSettings) -> str:
    if env:
        value = os.environ.get(env)
        if value:
            return value
        raise ConfigError(f"destination {dest.name!r}: the environment variable {env} holding its {what} is not set")
    assert file is not None  # the settings require one of the two
    try:
        return file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"destination {dest.name!r}: cannot read its {what} file {file}: "
                          f"{exc.strerror or type(exc).__name__}") from None


def _session(dest: DestinationSettings) -> requests.Session:
    session = requests.Session()
    session.verify = str(dest.ca_bundle) if dest.ca_bundle is not None else dest.verify_tls
    if dest.auth == "basic":
        assert dest.username is not None
        session.auth = (dest.username, _secret(dest.password_env, dest.password_file, "password", dest))
    elif dest.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {_secret(dest.token_env, dest.token_file, 'token', dest)}"
    return session


def _client(dest: DestinationSettings) -> DICOMwebClient:
    """A client that tries each request once: ``[delivery]`` retries with its own backoff.

    dicomweb-client retries by itself, up to 5 times with 2, 4, 8, 16 s pauses, on any
    exception (a refused connection included) and on 408/429/503/504: an archive that is down
    held one delivery attempt for 30 s before the node even counted it, and the prober and
    ``dicom-node echo`` as long.
    """
    assert dest.url is not None  # the settings require it for a dicomweb destination
    client = DICOMwebClient(dest.url.rstrip("/"), session=_session(dest), timeout=dest.timeout_seconds)
    client.set_http_retry_params(retry=False)
    return client


def _http_error(dest: DestinationSettings, exc: requests.RequestException) -> Exception:
    """A readable error from a failed request: the status and its name, never the request's headers."""
    response = getattr(exc, "response", None)
    if response is None:
        # Refused, timed out, TLS failure: the server may come back.
        kind = "TLS verification failed" if isinstance(exc, requests.exceptions.SSLError) else type(exc).__name__
        return TransientError(f"{dest.name} ({dest.url}) unreachable: {kind}")
    code = int(response.status_code)
    text = f"{dest.name} ({dest.url}) answered HTTP {code} {response.reason or ''}".rstrip()
    if code in (401, 403):
        return PermanentError(f"{text}: authentication refused (check the destination's credentials)")
    return TransientError(text) if code in _TRANSIENT_HTTP else PermanentError(text)


def _outcomes(answer: Dataset | None, datasets: Sequence[Dataset], paths: Sequence[Path]) -> list[InstanceResult]:
    """One result per sent instance from the STOW-RS response (PS3.18 Table 10.5.3-1)."""
    failed: dict[str, int] = {}
    warned: dict[str, str] = {}
    if answer is not None:
        for item in answer.get("FailedSOPSequence", []):
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = int(item.get("FailureReason", 0xC000))
        for item in answer.get("ReferencedSOPSequence", []):
            reason = item.get("WarningReason")
            if reason is not None:
                warned[str(item.get("ReferencedSOPInstanceUID", ""))] = f"warning reason 0x{int(reason):04X}"
    results = []
    for ds, path in zip(datasets, paths, strict=True):
        uid = str(ds.SOPInstanceUID)
        results.append(InstanceResult(path, uid, failed.get(uid, 0), warned.get(uid)))
    return results


def send(dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str) -> SendReport:
    """Store the files at ``dest`` with one STOW-RS request per study.

    Raises
    ------
    TransientError
        Unreachable, timed out, or an HTTP status a later attempt may get past (5xx, 429).
    PermanentError
        Refused credentials (401/403), another 4xx, or an instance the server reports failed.
    """
    del calling_ae_title  # DICOMweb has no AE titles
    if not paths:
        return SendReport(dest.name, ())
    client = _client(dest)
    by_study: dict[str, list[tuple[Dataset, Path]]] = {}
    for path in paths:
        ds = dcmread(path)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append((ds, Path(path)))
    results: list[InstanceResult] = []
    for study, items in by_study.items():
        datasets = [ds for ds, _ in items]
        try:
            answer: Any = client.store_instances(datasets, study_instance_uid=study)
        except requests.RequestException as exc:
            raise _http_error(dest, exc) from None
        outcomes = _outcomes(answer, datasets, [p for _, p in items])
        refused = [r for r in outcomes if r.status != 0]
        if refused:
            listing = ", ".join(f"{r.sop_instance_uid} (failure reason 0x{r.status:04X})" for r in refused)
            raise PermanentError(f"{dest.name} ({dest.url}) refused {len(refused)} of {len(outcomes)} "
                                 f"instances: {listing}")
        results.extend(outcomes)
    log.info("instances_sent", destination=dest.name, count=len(results), transport="stow-rs",
             warnings=sum(1 for r in results if r.warning))
    return SendReport(dest.name, tuple(results))


def reachable(dest: DestinationSettings, *, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
    """An authenticated QIDO-RS request (``GET studies?limit=1``): the endpoint answers and accepts
    the credentials."""
    del calling_ae_title
    try:
        session = _session(dest)
        assert dest.url is not None
        response = session.get(f"{dest.url.rstrip('/')}/studies", params={"limit": "1"}, timeout=timeout,
                               headers={"Accept": "application/dicom+json"})
    except ConfigError as exc:
        return False, str(exc)
    except requests.RequestException as exc:
        return False, str(_http_error(dest, exc))
    if response.status_code in (200, 204):
        return True, f"answers QIDO-RS (HTTP {response.status_code})"
    return False, str(_http_error(dest, requests.HTTPError(response=response)))


def _json_text(item: object, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object (PS3.18 F.2), or ``""`` (also for
    whatever a broken server sends instead)."""
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if isinstance(values, list) and values and values[0] is not None else ""


def check_overwrite(dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str,
                    timeout: float = 30.0) -> list[Overwrite]:
    """The ``dicomweb`` target's answer to "which version do you hold?": a QIDO-RS search per
    object (its study, series and SOP Instance UID) for InstanceCreationDate/Time, compared with
    the file's.  Requests time out after the destination's ``timeout_seconds``.

    Never raises for the server's sake: a search that fails or returns no creation time is
    ``replaced=None`` (unknown), so only a clear answer ever warns.
    """
    del calling_ae_title, timeout  # no AE titles; the client's timeout is the destination's
    stamped = [read_stamp(Path(p)) for p in paths]
    if not stamped:
        return []
    where = f"{dest.name} ({dest.url})"
    try:
        client = _client(dest)
    except ConfigError as exc:
        return [Overwrite(s.sop_instance_uid, None, f"QIDO-RS not possible: {exc}") for s in stamped]
    out: list[Overwrite] = []
    for s in stamped:
        try:
            found = client.search_for_instances(
                study_instance_uid=s.study_instance_uid, series_instance_uid=s.series_instance_uid,
                search_filters={"SOPInstanceUID": s.sop_instance_uid}, fields=list(_STAMP_TAGS),
            )
        except requests.RequestException as exc:
            out.append(Overwrite(s.sop_instance_uid, None, f"QIDO-RS failed: {_http_error(dest, exc)}"))
            continue
        except ValueError:  # not JSON (json's error; requests' own is a RequestException above)
            out.append(Overwrite(s.sop_instance_uid, None, f"QIDO-RS at {where} answered no DICOM JSON"))
            continue
        items = found if isinstance(found, list) else []
        held = next((" ".join(_json_text(item, t) for t in _STAMP_TAGS).strip() for item in items
                     if _json_text(item, _SOP_INSTANCE_UID) == s.sop_instance_uid), "")
        out.append(compare_stamps(s.sop_instance_uid, held, s.stamp, where=where, query="QIDO-RS"))
    return out
