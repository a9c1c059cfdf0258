"""Runtime LoRA adapters: `export --as-adapter`, the shared base, adapters in ChatModel, chat and serve, bad input."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import openai
import pytest
from click.testing import CliRunner

from edgeft.artifacts import Run
from edgeft.cli import cli
from edgeft.errors import ConfigError, ModelError
from edgeft.export.adapters import bases_dir, export
from edgeft.export.options import ExportConfig
from edgeft.export.verify import OnnxScorer
from edgeft.runtime import ChatModel
from edgeft.runtime.adapters import ADAPTER_FILE, BASE_FILE
from edgeft.runtime.server import create_app, load_adapters
from tests.helpers import LiveServer, recipes_like, run_cli, tiny_run

# fp32: base + adapter must then be the model as trained, to float rounding
FP32_ADAPTER = ExportConfig(precision="fp32", as_adapter=True, verify_samples=4)
HI = [{"role": "user", "content": "Ingredients: 2 cups tomato, 2 cups egg, 2 cups basil"}]


def _record(out: Path) -> dict:
    return json.loads((out / "edgeft-export.json").read_text())


def test_base_plus_adapter_is_the_model_as_trained(tiny_run_dir):
    out = export(tiny_run_dir, FP32_ADAPTER)
    info = _record(out)
    verification = info["verification"]
    assert verification["max_abs_logit_diff"] < 1e-3, verification
    assert verification["token_agreement"] == 1.0
    assert info["status"] == "done" and info["kind"] == "adapter"
    assert Run.open(tiny_run_dir).stage("adapter")["path"] == "onnx-adapter"
    assert (out / ADAPTER_FILE).stat().st_size == info["size_bytes"]
    base = Path(info["base"])
    assert json.loads((base / BASE_FILE).read_text())["identity"] == info["base_identity"]

    # Without an adapter the slots add nothing: the base export is the base model.
    from edgeft.export.verify import verify

    plain = verify(Run.open(tiny_run_dir).base_model().path, base, FP32_ADAPTER)
    assert plain["max_abs_logit_diff"] < 1e-3
    # and the adapter changes the answer's logits
    prompt, answer = [1, 2, 3, 4], [5, 6, 7]
    alone, tuned = OnnxScorer(base), OnnxScorer(base, out / ADAPTER_FILE)
    assert np.abs(alone.logits(prompt, answer) - tuned.logits(prompt, answer)).max() > 1e-4


def test_eval_scores_a_runtime_adapter_on_its_base(tiny_llama_run, tmp_path):
    """`edgeft eval RUN RUN/onnx-adapter BASE`: the adapter's row is its shared base answering with
    it; an fp32 base + adapter is the model as trained, so its answers and perplexity are the
    as-trained row's, and not the base's alone."""
    out = export(tiny_llama_run, replace(FP32_ADAPTER, verify=False))
    base = _record(out)["base"]
    report = tmp_path / "eval.json"
    result = run_cli("eval", tiny_llama_run, out, base, "--no-merged", "--max-tokens", "6", "--output", report)
    assert result.exit_code == 0, result.output
    trained, adapter, alone = json.loads(report.read_text())["rows"]
    assert adapter["label"] == f"{tiny_llama_run.name} base + adapter (ONNX)" and adapter["kind"] == "fine-tuned"
    assert alone["kind"] == "base"
    answers = {}
    for line in report.with_suffix(".predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        answers.setdefault(p["model"], []).append(p["prediction"])
    assert answers[adapter["label"]] == answers[trained["label"]] and len(answers[trained["label"]]) > 1
    assert adapter["perplexity"] == pytest.approx(trained["perplexity"], rel=2e-3)
    assert alone["perplexity"] != pytest.approx(trained["perplexity"], rel=2e-2)  # the adapter is what answered


def test_runs_on_one_base_share_its_export(tiny_llama_run, tmp_path, caplog):
    other = Path(shutil.copytree(tiny_llama_run, tmp_path / "other-run"))
    first = _record(export(tiny_llama_run, FP32_ADAPTER))
    base = Path(first["base"])
    stamp = (base / BASE_FILE).stat().st_mtime_ns
    caplog.set_level("INFO")
    second = _record(export(other, FP32_ADAPTER))
    assert second["base"] == first["base"] and (base / BASE_FILE).stat().st_mtime_ns == stamp
    assert "Using the base export" in caplog.text
    # other options make another base
    int8 = _record(export(other, ExportConfig(precision="int8", as_adapter=True, verify_samples=2), force=True))
    assert int8["base"] != first["base"]
    # a damaged base is built again, not used
    (base / "genai_config.json").unlink()
    again = _record(export(other, FP32_ADAPTER, force=True))
    assert again["base"] == first["base"] and (base / "genai_config.json").is_file()
    assert "is damaged" in caplog.text and again["verification"]["max_abs_logit_diff"] < 1e-3


def test_an_adapter_must_fit_its_base(tiny_llama_run, tiny_llama_export, tmp_path):
    out = export(tiny_llama_run, ExportConfig(precision="fp32", as_adapter=True, verify=False))
    base = ChatModel.load(_record(out)["base"])
    file = out / ADAPTER_FILE

    truncated = tmp_path / "truncated.onnx_adapter"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ModelError, match="not a readable adapter file"):
        base.with_adapter(truncated)

    from edgeft.export.adapters import adapter_parameters, write_adapter

    info = json.loads((base.path / BASE_FILE).read_text())
    config = json.loads((Run.open(tiny_llama_run).base_model().path / "config.json").read_text())
    params = adapter_parameters(Run.open(tiny_llama_run).adapter_dir, info["slots"], config)
    stranger = tmp_path / "stranger.onnx_adapter"
    write_adapter(params, stranger, "f" * 64)  # the same shapes, made for another base
    with pytest.raises(ModelError, match="made for another base model"):
        base.with_adapter(stranger)

    with pytest.raises(ModelError, match="no LoRA slots"):
        ChatModel.load(tiny_llama_export).with_adapter(file)
    with pytest.raises(ModelError, match="does not exist"):
        base.with_adapter(tmp_path / "missing")
    base.with_adapter(file, "tuned")
    with pytest.raises(ModelError, match="already loaded"):
        base.with_adapter(tiny_llama_run, "tuned")


def test_what_cannot_be_an_adapter_is_refused_before_work(tiny_llama, tiny_llama_run, tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        export(tiny_llama, FP32_ADAPTER)
    dora = tiny_run(tiny_llama, tmp_path / "dora", method="dora", max_steps=1)
    with pytest.raises(ConfigError, match="DoRA"):
        export(dora, FP32_ADAPTER)
    config = tiny_llama_run / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "modules_to_save": ["lm_head"]}))
    with pytest.raises(ConfigError, match="modules_to_save"):
        export(tiny_llama_run, FP32_ADAPTER)
    assert not bases_dir().exists() and Run.open(tiny_llama_run).stage("adapter") is None


@pytest.fixture
def two_adapters(tiny_llama, tmp_path) -> tuple[Path, Path, Path]:
    """Two runs on the tiny Llama, trained hard on different data, exported as adapters: (base, one, two)."""
    runs = [
        tiny_run(
            tiny_llama,
            tmp_path / name,
            data=str(recipes_like(tmp_path / f"{name}.jsonl", seed=seed)),
            epochs=3,
            learning_rate=1e-2,
        )
        for name, seed in (("one", 3), ("two", 7))
    ]
    cfg = ExportConfig(precision="fp32", as_adapter=True, verify=False)
    bases = {_record(export(run, cfg))["base"] for run in runs}
    assert len(bases) == 1
    return Path(bases.pop()), *runs


def test_serve_two_adapters_concurrently(two_adapters, tmp_path):
    base_dir, one, two = two_adapters
    base = ChatModel.load(base_dir)
    broken = tmp_path / "broken.onnx_adapter"
    broken.write_bytes(b"not an adapter")
    views, failed = load_adapters(base, [f"one={one}", f"two={two}", f"broken={broken}"])
    assert [v.name for v in views] == ["one", "two"] and "not a readable adapter" in failed["broken"]
    expected = {v.name: v.chat(HI, max_tokens=12, temperature=0).text for v in views}
    expected[base.name] = base.chat(HI, max_tokens=12, temperature=0).text
    assert len(set(expected.values())) == 3, expected  # each adapter answers its own way

    live = LiveServer(create_app(base, parallel=2, max_queue=16, adapters=views, failed_adapters=failed))
    try:
        client = live.client()
        assert sorted(m.id for m in client.models.list().data) == sorted(expected)

        def ask(name: str) -> tuple[str, str]:
            reply = client.chat.completions.create(model=name, messages=HI, max_tokens=12, temperature=0)
            return name, reply.choices[0].message.content

        names = ["one", "two", base.name] * 4
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, names))
        assert all(text == expected[name] for name, text in answers), answers

        chunks = client.chat.completions.create(model="two", messages=HI, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["two"]

        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="three", messages=HI, max_tokens=4)
        assert unknown.value.code == "model_not_found" and "'one'" in unknown.value.message
        with pytest.raises(openai.NotFoundError, match="failed to load"):
            client.chat.completions.create(model="broken", messages=HI, max_tokens=4)
        assert ask("one") == ("one", expected["one"])  # still serving
    finally:
        live.stop()


def test_cli_export_and_chat_with_an_adapter(tiny_llama_run):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tiny_llama_run), "--as-adapter", "--fp32", "--verify-samples", "2"])
    assert result.exit_code == 0, result.output
    assert "Exported the adapter" in result.output and "base (shared)" in result.output
    base = _record(tiny_llama_run / "onnx-adapter")["base"]
    expected = ChatModel.load(base, adapter=tiny_llama_run).chat(HI, max_tokens=6, temperature=0).text
    result = runner.invoke(
        cli,
        [
            "chat",
            base,
            "--adapter",
            str(tiny_llama_run),
            "-p",
            HI[0]["content"],
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert expected in result.output
    result = runner.invoke(cli, ["chat", base, "--adapter", str(tiny_llama_run / "nope"), "-p", "hi"])
    assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output
