"""Numeric settings from the environment: a value, or one line that names the variable."""
from __future__ import annotations

import pytest

from bec.config import number_setting
from bec.edges import aws
from bec.errors import BadInput


def test_a_number_is_read_and_a_whole_number_stays_whole() -> None:
    assert number_setting("BEC_STALE_AFTER", "90.5", unit="second") == 90.5
    value = number_setting("AWS_MAX_ATTEMPTS", "3", whole=True)
    assert value == 3 and isinstance(value, int)


@pytest.mark.parametrize("raw, whole, unit, message", [
    ("soon", False, "second", "BEC_STALE_AFTER must be a number of seconds, got 'soon'"),
    ("0.5", False, "second", "BEC_STALE_AFTER must be at least 1 second, got '0.5'"),
    ("2.5", True, "", "BEC_STALE_AFTER must be a whole number, got '2.5'"),
    ("0", True, "", "BEC_STALE_AFTER must be at least 1, got '0'"),
])
def test_a_bad_value_is_one_line_naming_the_variable(raw: str, whole: bool, unit: str, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        number_setting("BEC_STALE_AFTER", raw, whole=whole, unit=unit)
    assert str(caught.value) == message


def test_aws_max_attempts_sets_botocores_total_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    assert aws.retries() == {"mode": "adaptive", "total_max_attempts": 4}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "none")
    with pytest.raises(BadInput, match="AWS_MAX_ATTEMPTS must be a whole number"):
        aws.retries()
