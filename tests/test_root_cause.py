"""The root cause of an engine's failure is the line that says what was wrong: for a pydantic error
(vLLM validates its config with pydantic) the field and the reason, never the documentation URL that
pydantic prints last. Pure: a real pydantic error, the capture's own parsing."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, field_validator

from crossengine.adapters.capture import OutputCapture

REASON = "User-specified max_model_len (99999) is greater than the derived max_model_len (1024)"


class _Config(BaseModel):
    max_model_len: int

    @field_validator("max_model_len")
    @classmethod
    def _fits(cls, v: int) -> int:
        raise ValueError(REASON)


def _pydantic_error() -> Exception:
    with pytest.raises(Exception) as info:
        _Config(max_model_len=99999)
    return info.value


@pytest.fixture
def capture(tmp_path):
    cap = OutputCapture.__new__(OutputCapture)  # the parsing alone: no file descriptors redirected
    cap.path = str(tmp_path / "engine.log")
    return cap


def test_a_pydantic_error_in_the_output_names_field_and_reason(capture):
    text = f"INFO starting\nTraceback (most recent call last):\n  ...\npydantic_core._pydantic_core.ValidationError: {_pydantic_error()}\n"
    assert capture.root_cause(text) == f"ValidationError: max_model_len: {REASON}"


def test_a_raised_pydantic_error_is_one_line_without_the_docs_url(capture):
    open(capture.path, "w").close()  # an engine that printed nothing
    wrapped = capture.wrap(_pydantic_error())
    assert str(wrapped).startswith(f"ValidationError: max_model_len: {REASON}"), str(wrapped)
    assert "errors.pydantic.dev" not in str(wrapped)


def test_an_ordinary_exception_line_is_still_the_cause(capture):
    text = "(EngineCore pid=12) ERROR 12-05 10:00:00 [core.py:1] RuntimeError: Unsupported CPU attention configuration: head_dim=16\n"
    assert capture.root_cause(text) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16"


def test_a_model_level_pydantic_error_gives_its_reason():
    """vLLM's config checks the whole model (no field in the location): the reason alone."""
    from crossengine.errors import pydantic_summary

    text = "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n  Value error, max_model_len is too large [type=value_error, input_value=ArgsKwargs(()), input_type=ArgsKwargs]\n    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    assert pydantic_summary(text) == "max_model_len is too large"
