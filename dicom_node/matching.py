"""The grammar of a routing rule's ``match`` table: the keys it may name and how values compare.

A rule's ``match`` maps a DICOM keyword (or ``CallingAETitle`` / ``InstanceCount``) to:
- a string: equal, ignoring case and surrounding spaces;
- ``"/regex/"``: a regular expression searched in the value (case-insensitive);
- ``[min, max]``: a numeric range, inclusive (either end may be omitted with ``"*"``);
- a list of strings: any of them.
No Python is evaluated.  Settings validate rules with :func:`validate_match` at load time;
:mod:`dicom_node.scheduling.routing` evaluates them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from dicom_node.attributes import DERIVED_MATCH_KEYS, ROUTING_KEYWORDS

#: What a rule may match on: :mod:`dicom_node.attributes` declares them.
KNOWN_KEYS = frozenset(ROUTING_KEYWORDS + DERIVED_MATCH_KEYS)


def _is_range(expected: Any) -> bool:
    return (
        isinstance(expected, list)
        and len(expected) == 2
        and all(isinstance(v, int | float) or v == "*" for v in expected)
        and any(isinstance(v, int | float) for v in expected)
    )


def check(key: str, expected: Any, actual: Any) -> tuple[bool, str]:
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
        results = [check(key, e, actual) for e in expected]
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


def validate_match(rule_name: str, match: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for unknown keys or bad regular expressions in a rule's ``match``."""
    for key, expected in match.items():
        if key not in KNOWN_KEYS:
            raise ValueError(
                f"rule {rule_name!r}: cannot match on {key!r}; known keys: {', '.join(sorted(KNOWN_KEYS))}"
            )
        for e in expected if isinstance(expected, list) else [expected]:
            if isinstance(e, str) and len(e) >= 2 and e.startswith("/") and e.endswith("/"):
                try:
                    re.compile(e[1:-1])
                except re.error as exc:
                    raise ValueError(f"rule {rule_name!r}: bad regular expression {e!r} for {key}: {exc}") from None
