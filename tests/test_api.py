"""The library API that edgeft/__init__.py promises: each name imports and is the function it says."""

import inspect


def test_the_promised_names_import():
    import edgeft
    from edgeft.export import ExportConfig, export
    from edgeft.pipeline.merge import merge
    from edgeft.pipeline.tune import tune
    from edgeft.runtime import ChatModel

    assert edgeft.ChatModel is ChatModel
    for function in (export, merge, tune):
        assert inspect.isfunction(function) and function.__doc__
    assert ExportConfig().precision == "int4"
    for promised in (
        "from edgeft.runtime import ChatModel",
        "from edgeft.pipeline.tune import tune",
        "from edgeft.pipeline.merge import merge",
        "from edgeft.export import ExportConfig, export",
    ):
        assert promised in edgeft.__doc__


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    import edgeft.export

    with pytest.raises(AttributeError, match="no attribute 'exprot'"):
        edgeft.export.exprot  # noqa: B018
