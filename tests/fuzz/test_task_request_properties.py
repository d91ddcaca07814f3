"""Hypothesis over the task request: any JSON value is either a request exec() can take or one TaskError line."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rawvm_agent.tasks import TaskError, TaskRequest

pytestmark = pytest.mark.faults

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["", "=", "\0", "a\0b", "A=B"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
task_like = st.fixed_dictionaries(
    {"argv": st.lists(text, max_size=4) | json_values},
    optional={
        "env": st.dictionaries(text, text, max_size=4) | json_values,
        "cwd": text | json_values,
        "secret_env": st.lists(text, max_size=3) | json_values,
    },
)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(json_values, task_like))
def test_any_json_is_a_runnable_request_or_one_line_error(body: Any) -> None:
    json.dumps(body)  # it is what a client could send
    try:
        request = TaskRequest.from_json(body)
    except TaskError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # What exec() and the environment block accept: no NUL anywhere, no '=' in a name, argv[0] not empty.
    assert request.argv and request.argv[0]
    assert not any("\0" in a for a in request.argv)
    assert all(k and "=" not in k and "\0" not in k and "\0" not in v for k, v in request.env.items())
    assert "\0" not in request.cwd
