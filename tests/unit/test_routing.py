"""Routing rules: exact, regex, range and list matches, with reasons."""

from __future__ import annotations

from dicom_node.scheduling.routing import evaluate, matching_rules
from dicom_node.settings import RuleSettings

SERIES = {
    "Modality": "CT",
    "BodyPartExamined": "CHEST",
    "SeriesDescription": "Thorax 1.25mm Lung",
    "SliceThickness": 1.25,
    "CallingAETitle": "CT1",
    "InstanceCount": 300,
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
}


def rule(**match: object) -> RuleSettings:
    return RuleSettings(name="r", match=match, models=["ct-tissue"])


def test_exact_match_ignores_case() -> None:
    """Strings match exactly, ignoring case."""
    assert evaluate(rule(Modality="ct"), SERIES).matched
    assert not evaluate(rule(Modality="MR"), SERIES).matched


def test_regex_range_and_list() -> None:
    """'/re/' searches, [min, max] is an inclusive numeric range, a list means any of."""
    assert evaluate(rule(SeriesDescription="/lung|thorax/"), SERIES).matched
    assert not evaluate(rule(SeriesDescription="/^abdomen/"), SERIES).matched
    assert evaluate(rule(SliceThickness=[0.5, 2.5]), SERIES).matched
    assert not evaluate(rule(SliceThickness=[2, "*"]), SERIES).matched
    assert evaluate(rule(InstanceCount=[100, "*"]), SERIES).matched
    assert evaluate(rule(CallingAETitle=["PACS", "CT1"]), SERIES).matched


def test_absent_attribute_does_not_match_and_says_why() -> None:
    """A rule on an attribute the series lacks does not match, and the reason says so."""
    result = evaluate(rule(ProtocolName="/chest/"), SERIES)
    assert not result.matched
    assert "ProtocolName is absent" in result.reasons[0]


def test_all_conditions_must_hold() -> None:
    """Every key of a rule must match; matching_rules keeps only full matches."""
    ok = RuleSettings(name="ok", match={"Modality": "CT", "BodyPartExamined": "chest"}, models=["m"])
    no = RuleSettings(name="no", match={"Modality": "CT", "BodyPartExamined": "HEAD"}, models=["m"])
    assert [r.name for r in matching_rules([ok, no], SERIES)] == ["ok"]
