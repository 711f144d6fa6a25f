"""Routing rules: which models run on a completed series, with which priority, sent where.

The grammar of a rule's ``match`` table is :mod:`dicom_node.matching`.  Every rule
that matches produces jobs (one per model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.matching import KNOWN_KEYS, check, validate_match
from dicom_node.settings import RuleSettings

__all__ = ["KNOWN_KEYS", "RuleMatch", "evaluate", "matching_rules", "validate_rule"]

@dataclass(frozen=True)
class RuleMatch:
    rule: RuleSettings
    matched: bool
    reasons: tuple[str, ...]


def validate_rule(rule: RuleSettings) -> None:
    """Raise ``ValueError`` for unknown keys or bad regular expressions in ``rule.match``."""
    validate_match(rule.name, rule.match)


def evaluate(rule: RuleSettings, attributes: Mapping[str, Any]) -> RuleMatch:
    """Match one rule against series attributes and say why."""
    reasons = []
    matched = True
    for key, expected in rule.match.items():
        ok, why = check(key, expected, attributes.get(key))
        reasons.append(why)
        matched = matched and ok
    if not rule.match:
        reasons.append("rule matches every series")
    return RuleMatch(rule, matched, tuple(reasons))


def matching_rules(rules: Sequence[RuleSettings], attributes: Mapping[str, Any]) -> list[RuleSettings]:
    return [r for r in rules if evaluate(r, attributes).matched]
