"""edgeft.runtime: run an exported model on CPU with onnxruntime-genai (no torch, no transformers).

    from edgeft.runtime import ChatModel

    model = ChatModel.load("runs/demo")               # a run directory or its onnx-int4 folder
                                                      # (a --int4-base run: its base export + adapter)
    reply = model.chat([{"role": "user", "content": "hi"}], max_tokens=128, temperature=0.0)
    print(reply.text, reply.finish_reason, reply.usage)

    stream = model.stream(messages, max_tokens=256)
    for piece in stream:
        print(piece, end="", flush=True)
    print(stream.result.usage)

    # answers that fit a JSON Schema (OpenAI's response_format shapes; every token is constrained)
    model.chat(messages, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {...}}})
    model.chat(messages, response_format=json_schema_format("schema.json"))

    # runtime LoRA adapters on a shared base (edgeft export RUN --as-adapter)
    recipes = ChatModel.load(base_folder).with_adapter("runs/recipes")

The terminal chat (`edgeft.runtime.chat`) and the server (`edgeft.runtime.server`, needs
edgeft[serve]) are built on the same ChatModel.
"""

from edgeft.runtime.batching import BatchDecoder
from edgeft.runtime.engine import (
    ChatModel,
    ChatResult,
    ChatStream,
    ContextLengthError,
    GenerationOptions,
    PromptCache,
    json_schema_format,
)

__all__ = [
    "BatchDecoder",
    "ChatModel",
    "ChatResult",
    "ChatStream",
    "ContextLengthError",
    "GenerationOptions",
    "PromptCache",
    "json_schema_format",
]
