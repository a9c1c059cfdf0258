"""edgeft: fine-tune a small language model and run it on the edge with ONNX Runtime.

The library comes first; the `edgeft` command calls the same functions:

    from edgeft.runtime import ChatModel          # needs only the base install (no torch)
    from edgeft.pipeline.tune import tune         # needs edgeft[train]; TuneConfig in edgeft.pipeline.config
    from edgeft.pipeline.merge import merge
    from edgeft.export import ExportConfig, export   # needs edgeft[export]
"""

__version__ = "0.1.0"

__all__ = ["ChatModel", "__version__"]


def __getattr__(name: str):
    # Importing the runtime lazily keeps `import edgeft` (and `edgeft --help`) instant.
    if name == "ChatModel":
        from edgeft.runtime import ChatModel

        return ChatModel
    raise AttributeError(f"module 'edgeft' has no attribute {name!r}")
