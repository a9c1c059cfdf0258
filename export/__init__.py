"""edgeft.export: a merged model -> a verified ONNX folder for onnxruntime-genai.

from edgeft.export import ExportConfig, export
export("runs/NAME", ExportConfig(precision="int4"))   # -> runs/NAME/onnx-int4
"""

__all__ = ["ExportConfig", "export"]


def __getattr__(name: str):
    # Lazy, so that importing a submodule does not pull in the exporter's heavy imports.
    if name == "ExportConfig":
        from edgeft.export.options import ExportConfig

        return ExportConfig
    if name == "export":
        from edgeft.export.onnx import export

        return export
    raise AttributeError(f"module 'edgeft.export' has no attribute {name!r}")
