"""The embedded Valkey's append-only fsync policy: `no` (written before each answer) unless told otherwise."""

from __future__ import annotations

import pytest

from touchstream.embedded import VALKEY_APPENDFSYNC_ENV, valkey_appendfsync_from_env


def test_acknowledged_writes_are_written_before_the_answer_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VALKEY_APPENDFSYNC_ENV, raising=False)
    assert valkey_appendfsync_from_env() == "no"
    monkeypatch.setenv(VALKEY_APPENDFSYNC_ENV, " everysec ")
    assert valkey_appendfsync_from_env() == "everysec"


def test_a_policy_valkey_does_not_have_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VALKEY_APPENDFSYNC_ENV, "sometimes")
    expected = f"{VALKEY_APPENDFSYNC_ENV} must be one of no, always, everysec, got 'sometimes'"
    with pytest.raises(ValueError, match=expected):
        valkey_appendfsync_from_env()
