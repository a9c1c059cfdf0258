"""edgeft.runtime: run an exported model on CPU with onnxruntime-genai (no torch, no transformers).

    from edgeft.runtime import ChatModel

    model = ChatModel.load("runs/demo")               # a run directory or its onnx-int4 folder
    reply = model.chat([{"role": "user", "content": "hi"}], max_tokens=128, temperature=0.0)
    print(reply.text, reply.finish_reason, reply.usage)

    stream = model.stream(messages, max_tokens=256)
    for piece in stream:
        print(piece, end="", flush=True)
    print(stream.result.usage)

The terminal chat (`edgeft.runtime.chat`) and the server (`edgeft.runtime.server`, needs
edgeft[serve]) are built on the same ChatModel.
"""

from edgeft.runtime.engine import ChatModel, ChatResult, ChatStream, ContextLengthError, GenerationOptions

__all__ = ["ChatModel", "ChatResult", "ChatStream", "ContextLengthError", "GenerationOptions"]
