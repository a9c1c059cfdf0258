"""The runtime on the real SmolLM2-135M-Instruct: what only a real model shows (it answers, it stops)."""

from __future__ import annotations

import pytest

from edgeft.runtime import ChatModel
from tests.conftest import _build_test_export

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("smollm2_fp32")]  # one worker builds the export

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_model(real_home, tmp_path_factory) -> ChatModel:
    export = _build_test_export(real_home / "models" / "smollm2-135m", tmp_path_factory.mktemp("real") / "onnx-fp32")
    return ChatModel.load(export)


def test_real_model_answers_and_stops_at_the_end_of_its_turn(smollm2_model):
    reply = smollm2_model.chat(QUESTION, max_tokens=64, temperature=0)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"  # it ended on <|im_end|>, well before max_tokens
    assert reply.usage["completion_tokens"] < 64
    assert "<|im_end|>" not in reply.text and "<|im_start|>" not in reply.text


def test_real_model_streams_the_same_answer_with_a_stop_string(smollm2_model):
    full = smollm2_model.chat(QUESTION, max_tokens=64, temperature=0).text
    stream = smollm2_model.stream(QUESTION, max_tokens=64, temperature=0, stop=["Paris"])
    assert "".join(stream) == full[: full.index("Paris")]
    assert stream.result.finish_reason == "stop"
