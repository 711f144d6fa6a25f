"""Routing rules: which models run on a completed series, with which priority, sent where.

A rule's ``match`` table maps a DICOM keyword (or ``CallingAETitle`` / ``InstanceCount``) to:
- a string: equal, ignoring case and surrounding spaces;
- ``"/regex/"``: a regular expression searched in the value (case-insensitive);
- ``[min, max]``: a numeric range, inclusive (either end may be omitted with ``"*"``);
- a list of strings: any of them.
No Python is evaluated.  Every rule that matches produces jobs (one per model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.settings import RuleSettings

KNOWN_KEYS = frozenset(
    {
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "ProtocolName",
        "SOPClassUID",
        "SliceThickness",
        "Manufacturer",
        "CallingAETitle",
        "InstanceCount",
    }
)


@dataclass(frozen=True)
class RuleMatch:
    rule: RuleSettings
    matched: bool
    reasons: tuple[str, ...]


def _is_range(expected: Any) -> bool:
    return (
        isinstance(expected, list)
        and len(expected) == 2
        and all(isinstance(v, int | float) or v == "*" for v in expected)
        and any(isinstance(v, int | float) for v in expected)
    )


def _check(key: str, expected: Any, actual: Any) -> tuple[bool, str]:
    if actual is None or actual == "":
        return False, f"{key} is absent (rule wants {expected!r})"
    if _is_range(expected):
        try:
            value = float(actual)
        except (TypeError, ValueError):
            return False, f"{key}={actual!r} is not a number (rule wants range {expected})"
        lo, hi = expected
        ok = (lo == "*" or value >= float(lo)) and (hi == "*" or value <= float(hi))
        return ok, f"{key}={value:g} {'in' if ok else 'not in'} [{lo}, {hi}]"
    if isinstance(expected, list):
        results = [_check(key, e, actual) for e in expected]
        ok = any(r[0] for r in results)
        return ok, f"{key}={actual!r} {'is' if ok else 'is not'} one of {expected!r}"
    text = str(actual).strip()
    if isinstance(expected, str) and len(expected) >= 2 and expected.startswith("/") and expected.endswith("/"):
        ok = re.search(expected[1:-1], text, flags=re.IGNORECASE) is not None
        return ok, f"{key}={text!r} {'matches' if ok else 'does not match'} {expected}"
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        try:
            ok = float(actual) == float(expected)
        except (TypeError, ValueError):
            ok = False
        return ok, f"{key}={text!r} {'==' if ok else '!='} {expected}"
    ok = text.upper() == str(expected).strip().upper()
    return ok, f"{key}={text!r} {'==' if ok else '!='} {expected!r}"


def validate_rule(rule: RuleSettings) -> None:
    """Raise ``ValueError`` for unknown keys or bad regular expressions in ``rule.match``."""
    for key, expected in rule.match.items():
        if key not in KNOWN_KEYS:
            raise ValueError(
                f"rule {rule.name!r}: cannot match on {key!r}; known keys: {', '.join(sorted(KNOWN_KEYS))}"
            )
        for e in expected if isinstance(expected, list) else [expected]:
            if isinstance(e, str) and len(e) >= 2 and e.startswith("/") and e.endswith("/"):
                try:
                    re.compile(e[1:-1])
                except re.error as exc:
                    raise ValueError(f"rule {rule.name!r}: bad regular expression {e!r} for {key}: {exc}") from None


def evaluate(rule: RuleSettings, attributes: Mapping[str, Any]) -> RuleMatch:
    """Match one rule against series attributes and say why."""
    reasons = []
    matched = True
    for key, expected in rule.match.items():
        ok, why = _check(key, expected, attributes.get(key))
        reasons.append(why)
        matched = matched and ok
    if not rule.match:
        reasons.append("rule matches every series")
    return RuleMatch(rule, matched, tuple(reasons))


def matching_rules(rules: Sequence[RuleSettings], attributes: Mapping[str, Any]) -> list[RuleSettings]:
    return [r for r in rules if evaluate(r, attributes).matched]
