"""Issue 11's agent features through `serve --parallel`: the tool-call, json_schema, streaming and logprobs
server tests of test_runtime_tools, collected again here against an app whose requests run on an engine."""

from __future__ import annotations

import pytest
from test_runtime_server import openai_client, serving
from test_runtime_tools import (  # noqa: F401  (collected again here, against the parallel server)
    model,
    qwen3_gguf,
    test_json_schema_response_format,
    test_logprobs_shapes,
    test_streamed_tool_call_assembles_from_deltas,
    test_tool_round_trip_through_the_server,
)

from marco_gguf.runtime import server


@pytest.fixture(scope="module")
def base_url(model):  # noqa: F811  (model: the tools module's fixture)
    with model.engine(2, unified=True) as engine, serving(server.create_app(model, "marco-tiny", engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url)
