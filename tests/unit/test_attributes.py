"""Every routing key of dicom_node.attributes is read from the header on the receive path, kept
with its series by the catalog and matched by a rule: a new line there needs nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.attributes import HEADER_KEYWORDS, ROUTING_KEYWORDS
from dicom_node.catalog import Catalog
from dicom_node.ingest.events import StoredInstance
from dicom_node.ingest.header import parse_header
from dicom_node.matching import KNOWN_KEYS
from dicom_node.scheduling.routing import evaluate
from dicom_node.settings import RuleSettings

#: A header value and a rule value that must match it, by VR.
EXAMPLES: dict[str, tuple[Any, Any]] = {
    "CS": ("ROUTE", "route"),
    "LO": ("Routine chest 1.0 B40f", "/chest/"),
    "SH": ("SCANNER-7", "scanner-7"),
    "DS": ("2.5", [2.0, 3.0]),
}


def _encoded(keyword: str, value: Any) -> tuple[bytes, Dataset]:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    setattr(ds, keyword, ["ORIGINAL", "PRIMARY", value] if keyword == "ImageType" else value)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue(), ds


def test_routing_keys_are_header_keys_and_rule_keys() -> None:
    """The rule grammar accepts every routing keyword and the header reader reads it."""
    assert set(ROUTING_KEYWORDS) <= KNOWN_KEYS
    assert set(ROUTING_KEYWORDS) <= set(HEADER_KEYWORDS)
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(HEADER_KEYWORDS)


@pytest.mark.parametrize("keyword", [k for k in ROUTING_KEYWORDS if k != "Modality"])
def test_every_routing_key_is_read_kept_and_matched(tmp_path: Path, keyword: str) -> None:
    """A header value of each routing key reaches the series' routing attributes through the
    receive path's header reader and the catalog, and a rule on it matches."""
    header_value, rule_value = EXAMPLES[dictionary_VR(keyword)]
    raw, ds = _encoded(keyword, header_value)
    found, attributes = parse_header(raw, ExplicitVRLittleEndian)
    assert found["SOPInstanceUID"] == ds.SOPInstanceUID
    assert keyword in attributes
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.record_instances([StoredInstance(
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=CTImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
        path=tmp_path / "x.dcm", size=len(raw), calling_ae_title="CT1", association_id="a", received_at=1.0,
        attributes=attributes,
    )])
    series = catalog.get_series(ds.SeriesInstanceUID)
    assert series is not None
    routed = series.routing_attributes()
    assert routed[keyword] == attributes[keyword]
    if keyword == "ImageType":
        rule_value = "/ROUTE/"
    rule = RuleSettings(name="r", models=["m"], match={keyword: rule_value})
    verdict = evaluate(rule, routed)
    assert verdict.matched, verdict.reasons
    assert not evaluate(RuleSettings(name="r", models=["m"], match={keyword: "/no-such-value/"}), routed).matched
    assert routed["CallingAETitle"] == "CT1" and routed["InstanceCount"] == 1
    assert routed["SOPClassUID"] == CTImageStorage
