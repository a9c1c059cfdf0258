"""edgeft bench: how fast is an export on this machine, and against what users would use otherwise?

Per engine: load time, time to first token for a short (~32 token) and a long (~512 token) prompt,
decode tokens/s over 128 tokens, peak memory (RSS), size on disk; several runs, median and spread.
`compare=True` adds, at the same thread count: the merged PyTorch model (transformers `generate`),
the Optimum export run by `ORTModelForCausalLM`, and llama.cpp (`llama-cpp-python`, if installed)
on a Q4 GGUF of the same base model. Each engine runs in its own process, so memory and threads
are its own; results are also given as ratios to edgeft's export.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.cpu import cpu_flags, ort_session_options, usable_cpus
from edgeft.errors import EdgeftError, ExportError
from edgeft.runtime.engine import og_config

log = logging.getLogger(__name__)

FILLER = (
    "The history of bread is a long one. People baked flat loaves from wild grains long before farming, and every "
    "culture found its own way to mix flour, water and salt, to let the dough rise, and to bake it in ash, on stones "
    "or in clay ovens. "
)


@dataclass
class Settings:
    runs: int = 3
    threads: int = 0  # 0 = all cores
    decode_tokens: int = 128
    short_tokens: int = 32
    long_tokens: int = 512


# --- the measurements, one engine per process ----------------------------------------------


def _prompts(encode, settings: Settings) -> tuple[list[int], list[int]]:
    """Token ids of about `short_tokens` and `long_tokens`, cut from the same filler text."""
    ids = encode(FILLER * (settings.long_tokens // 30 + 2))
    return ids[: settings.short_tokens], ids[: settings.long_tokens]


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def _measure(load, first_token, decode, settings: Settings, encode) -> dict:
    """The shared protocol: load once, then for each run TTFT(short), TTFT(long), decode(short)."""
    start = time.perf_counter()
    state = load()
    load_s = time.perf_counter() - start
    short, long = _prompts(lambda t: encode(state, t), settings)
    first_token(state, short)  # warm-up: first calls allocate and pick kernels
    ttft_short, ttft_long, decode_rates = [], [], []
    for _ in range(settings.runs):
        ttft_short.append(first_token(state, short))
        ttft_long.append(first_token(state, long))
        decode_rates.append(decode(state, short, settings.decode_tokens))
    return {
        "load_s": round(load_s, 3),
        "ttft_short_s": _summary(ttft_short),
        "ttft_long_s": _summary(ttft_long),
        "decode_tokens_per_s": _summary(decode_rates),
        "peak_rss_mb": artifacts.peak_rss_mb(),
        "prompt_tokens": {"short": len(short), "long": len(long)},
    }


def measure_genai(folder: str, settings: Settings) -> dict:
    """An export folder, or a runtime adapter's folder: its base export answering with the adapter."""
    import onnxruntime_genai as og

    from edgeft.runtime.adapters import resolve_adapter
    from edgeft.runtime.engine import adapter_alone

    base, adapter = adapter_alone(Path(folder)) or (Path(folder), None)

    def load():
        model = og.Model(og_config(base, settings.threads or usable_cpus()))
        adapters = None
        if adapter is not None:
            adapters = og.Adapters(model)
            adapters.load(str(resolve_adapter(adapter)), "adapter")
        return model, og.Tokenizer(model), adapters

    def generator(state, prompt, new):
        params = og.GeneratorParams(state[0])
        params.set_search_options(do_sample=False, max_length=len(prompt) + new, min_length=len(prompt) + new)
        g = og.Generator(state[0], params)
        if state[2] is not None:
            g.set_active_adapter(state[2], "adapter")
        return g

    def first_token(state, prompt):
        start = time.perf_counter()
        g = generator(state, prompt, 1)
        g.append_tokens(prompt)
        g.generate_next_token()
        g.get_next_tokens()
        return time.perf_counter() - start

    def decode(state, prompt, n):
        g = generator(state, prompt, n + 1)
        g.append_tokens(prompt)
        g.generate_next_token()
        start = time.perf_counter()
        for _ in range(n):
            g.generate_next_token()
            g.get_next_tokens()
        return n / (time.perf_counter() - start)

    return _measure(load, first_token, decode, settings, lambda state, text: [int(t) for t in state[1].encode(text)])


def _torch_common(settings: Settings):
    import torch

    torch.set_num_threads(settings.threads or usable_cpus())
    return torch


def _hf_first_and_decode(torch, generate):
    def first_token(state, prompt):
        start = time.perf_counter()
        generate(state, prompt, 1)
        return time.perf_counter() - start

    def decode(state, prompt, n):
        # decode rate = the extra tokens over the extra time, so prefill is not counted
        start = time.perf_counter()
        generate(state, prompt, 1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        generate(state, prompt, n + 1)
        return n / max(time.perf_counter() - start - one, 1e-9)

    return first_token, decode


def measure_pytorch(folder: str, settings: Settings) -> dict:
    torch = _torch_common(settings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
            folder
        )

    def generate(state, prompt, n):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            state[0].generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=state[1].pad_token_id,
            )

    first_token, decode = _hf_first_and_decode(torch, generate)
    return _measure(
        load, first_token, decode, settings, lambda state, text: state[1].encode(text, add_special_tokens=False)
    )


def measure_optimum(folder: str, settings: Settings) -> dict:
    torch = _torch_common(settings)
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    def load():
        options = ort_session_options(settings.threads)
        return ORTModelForCausalLM.from_pretrained(folder, session_options=options), AutoTokenizer.from_pretrained(
            folder
        )

    def generate(state, prompt, n):
        ids = torch.tensor([prompt])
        state[0].generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=state[1].pad_token_id,
        )

    first_token, decode = _hf_first_and_decode(torch, generate)
    return _measure(
        load, first_token, decode, settings, lambda state, text: state[1].encode(text, add_special_tokens=False)
    )


def measure_llamacpp(gguf: str, settings: Settings) -> dict:
    from llama_cpp import Llama

    def load():
        threads = settings.threads or usable_cpus()
        return Llama(
            model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512, verbose=False
        )

    def first_token(llm, prompt):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        llm.sample(temp=0.0)
        return time.perf_counter() - start

    def decode(llm, prompt, n):
        llm.reset()
        llm.eval(prompt)
        token = llm.sample(temp=0.0)
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return n / (time.perf_counter() - start)

    return _measure(load, first_token, decode, settings, lambda llm, text: llm.tokenize(text.encode(), add_bos=False))


ENGINES = {"genai": measure_genai, "pytorch": measure_pytorch, "optimum": measure_optimum, "llamacpp": measure_llamacpp}


def _child(measure, target: str, settings: Settings, results, logs: str) -> None:
    # The engine's stderr goes to a file the parent reads if the engine dies, and faulthandler
    # writes the Python stack of a fatal signal (SIGILL, SIGSEGV, SIGABRT) to another, for -v.
    sys.stderr.flush()
    fd = os.open(Path(logs) / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    with open(Path(logs) / "stack", "w") as stack:
        faulthandler.enable(stack)
        try:
            results.send(("ok", measure(target, settings)))
        except Exception as e:  # reported in the table, not a crash of the whole benchmark
            summary = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results.send(("error", summary, traceback.format_exc()))
        finally:
            faulthandler.disable()


# What a fatal signal most often means for an inference engine.
SIGNAL_CAUSES = {
    "SIGILL": "illegal instruction: built for a CPU this one is not",
    "SIGKILL": "killed from outside, most often by the out-of-memory killer (see `dmesg`)",
    "SIGSEGV": "segmentation fault in native code",
    "SIGBUS": "bus error: a memory-mapped model file changed or the disk is full",
    "SIGABRT": "aborted by native code",
}


def run_engine(engine: str, target: Path, settings: Settings, timeout: float = 900) -> dict:
    """Measure one engine in a fresh process (its own memory peak, no shared thread pools). An
    engine that dies is reported at once, with how it died and its last output (all of it with -v)."""
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix=f"edgeft-bench-{engine}-") as logs:
        process = context.Process(
            target=_child, args=(ENGINES[engine], str(target), settings, sender, logs), daemon=True
        )
        process.start()
        sender.close()  # the child holds the only sending end now: its death ends the pipe, and poll returns
        try:
            if not receiver.poll(timeout):
                process.kill()
                return {"error": f"the {engine} engine gave no result within {timeout:.0f} s"}
            status, payload, *trace = receiver.recv()
        except EOFError:
            process.join(timeout=10)
            return {"error": _death(engine, process.exitcode, Path(logs))}
        finally:
            process.join(timeout=10)
            receiver.close()
    if trace:
        log.debug(f"The {engine} engine failed:\n{trace[0]}")
    return payload if status == "ok" else {"error": payload}


def _death(engine: str, exitcode: int | None, logs: Path) -> str:
    """How an engine's process ended and the last lines it wrote; all of them, and its stack, with -v."""
    output, stack = (
        (logs / name).read_text(errors="replace") if (logs / name).exists() else "" for name in ("stderr", "stack")
    )
    log.debug(f"The {engine} engine's output:\n{output}{stack}")
    last = [line.strip() for line in output.splitlines() if line.strip()][-3:]
    return f"the {engine} engine died: {_how_it_ended(exitcode)}" + (
        f"; its last output: {' / '.join(last)}" if last else ""
    )


def _how_it_ended(exitcode: int | None) -> str:
    """'killed by SIGILL (illegal instruction: ...)' or 'exited with code 1'."""
    if exitcode is None or exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        return f"killed by signal {-exitcode}"
    return f"killed by {name} ({SIGNAL_CAUSES.get(name) or signal.strsignal(-exitcode)})"


# --- what to compare -------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    engine: str
    path: Path
    note: str = ""


def plan(
    path: Path, compare: bool, gguf: str | None, engines: tuple[str, ...] = ("pytorch", "optimum", "llamacpp")
) -> tuple[list[Target], Path, Run | None]:
    """edgeft's export first (the baseline of every ratio), then the comparisons that can run here."""
    from edgeft.runtime.engine import adapter_alone, resolve_export

    if alone := adapter_alone(Path(path)):  # a runtime adapter: its base export answering with it
        folder = alone[1]
        targets = [Target(f"edgeft {folder.name}", "genai", folder, f"the base {alone[0].name} + this adapter")]
    else:
        folder, _ = resolve_export(Path(path))
        targets = [Target(f"edgeft {folder.name}", "genai", folder)]
    run = _run_of(Path(path), folder)
    if not compare:
        return targets, folder, run
    source = _source_model(folder, run)
    if source is not None and "pytorch" in engines:
        targets.append(Target("PyTorch fp32 (transformers)", "pytorch", source))
    if source is not None and "optimum" in engines:
        optimum = _optimum_export(folder, source, run)
        if optimum is not None:
            targets.append(Target(f"Optimum {optimum.name} (ORTModelForCausalLM)", "optimum", optimum))
    if "llamacpp" not in engines:
        return targets, folder, run
    gguf_path = Path(gguf) if gguf else _base_gguf(run)
    try:
        import llama_cpp  # noqa: F401

        if gguf_path is not None and gguf_path.is_file():
            targets.append(
                Target(f"llama.cpp {gguf_path.name}", "llamacpp", gguf_path, "base model GGUF (same architecture)")
            )
        else:
            log.warning("llama.cpp: no GGUF of the base model found (pass --gguf FILE); skipped.")
    except ImportError:
        log.warning(
            "llama.cpp: llama-cpp-python is not installed (pip install 'edgeft[llamacpp]', ~5 min compile); skipped."
        )
    return targets, folder, run


def _run_of(path: Path, folder: Path) -> Run | None:
    for candidate in (path, folder.parent):
        if Run.is_run(candidate):
            return Run.open(candidate)
    return None


def _source_model(folder: Path, run: Run | None) -> Path | None:
    if run and run.has_merged():
        return run.merged_dir
    record = folder / "edgeft-export.json"
    if record.is_file():
        source = Path(json.loads(record.read_text()).get("source", ""))
        if (source / "config.json").is_file():
            return source
    log.warning("PyTorch/Optimum: the model this export came from was not found; skipped.")
    return None


def _optimum_export(folder: Path, source: Path, run: Run | None) -> Path | None:
    """An Optimum int4 export of the same model (made once, kept beside the edgeft export)."""
    if (folder / "config.json").is_file():  # already an Optimum-graph export
        return folder
    target = folder.with_name(folder.name + "-optimum")
    if not (target / "config.json").is_file():
        from edgeft.export.onnx import ExportConfig, export

        log.info(f"Making an Optimum int4 export of {source} for the comparison (once)...")
        precision = (
            json.loads((folder / "edgeft-export.json").read_text())["precision"]
            if (folder / "edgeft-export.json").exists()
            else "int4"
        )
        try:
            export(
                str(source),
                ExportConfig(precision=precision, backend="optimum", verify=False, output=str(target)),
                force=True,
            )
        except EdgeftError as e:
            log.warning(f"Optimum: could not export ({e}); skipped.")
            return None
    return target


def _base_gguf(run: Run | None) -> Path | None:
    from edgeft.models import builtin_path

    spec = run.base_model().spec if run else "smollm2-135m"
    for candidate in (
        run.base_model().path / "source.gguf" if run else None,
        builtin_path(spec) / "source.gguf",
    ):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


# --- the report ------------------------------------------------------------------------------


def bench(
    path: str | Path,
    *,
    compare: bool = False,
    settings: Settings | None = None,
    gguf: str | None = None,
    output: str | Path | None = None,
    engines: tuple[str, ...] = ("pytorch", "optimum", "llamacpp"),
) -> dict:
    """Benchmark an export (and, with compare, the alternatives); write JSON, Markdown and a PNG."""
    from edgeft.progress import progress

    settings = settings or Settings()
    if settings.runs < 1 or settings.threads < 0 or settings.decode_tokens < 1:
        raise ExportError("--runs and --decode-tokens must be at least 1, --threads 0 (all cores) or more.")
    targets, folder, run = plan(Path(path), compare, gguf, engines)
    threads = settings.threads or usable_cpus()
    results = []
    for target in progress(targets, desc="benchmark", unit="engine"):
        log.info(f"Measuring {target.name}...")
        result = run_engine(target.engine, target.path, settings)
        result.update(
            name=target.name,
            engine=target.engine,
            path=str(target.path),
            note=target.note,
            size_bytes=_size(target.path),
        )
        results.append(result)
    _ratios(results)
    report = {
        "machine": machine(),
        "threads": threads,
        "settings": vars(settings),
        "finished_at": artifacts.now(),
        "results": results,
    }
    out_dir = Path(output) if output else (run.logs_dir if run else folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(out_dir / "bench.json", report)
    (out_dir / "bench.md").write_text("\n".join(markdown(report)) + "\n")
    kinds = ("md", "json", "png") if chart(report, out_dir / "bench.png") else ("md", "json")
    report["paths"] = {k: str(out_dir / f"bench.{k}") for k in kinds}
    if run:
        run.record_stage(
            "bench", status="done", report=str(out_dir / "bench.json"), results=results, finished_at=artifacts.now()
        )
    return report


def _size(path: Path) -> int:
    """What the engine loads: a folder or file, and for a runtime adapter its base too."""
    from edgeft.runtime.engine import adapter_alone

    alone = adapter_alone(path) if path.is_dir() else None
    return artifacts.dir_size(path) + (artifacts.dir_size(alone[0]) if alone else 0)


def _ratios(results: list[dict]) -> None:
    """Each engine against edgeft's export (the first row): >1 means edgeft is that much better."""
    base = results[0]
    if "error" in base:
        return
    for r in results[1:]:
        if "error" in r:
            continue
        r["edgeft_vs_this"] = {
            "decode_speed": round(base["decode_tokens_per_s"]["median"] / r["decode_tokens_per_s"]["median"], 2),
            "ttft_long": round(r["ttft_long_s"]["median"] / base["ttft_long_s"]["median"], 2),
            "size": round(r["size_bytes"] / base["size_bytes"], 2),
            "memory": round(r["peak_rss_mb"] / base["peak_rss_mb"], 2),
        }


# The instruction sets ONNX Runtime's and PyTorch's CPU kernels choose between: int4/int8 matmuls
# want VNNI, bf16 wants AVX512-BF16 or AMX; most laptops and edge boxes have AVX2 + FMA only.
def machine() -> str:
    """The CPU, its cores, RAM and speed-relevant flags: printed beside every speed figure."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    flags = " ".join(cpu_flags()) or "unknown"
    return (
        f"{cpu}, {usable_cpus()} cores, {total / 2**30:.0f} GiB RAM, {platform.system()} {platform.machine()}; "
        f"CPU flags: {flags}"
    )


def markdown(report: dict) -> list[str]:
    lines = [
        f"Machine: {report['machine']}; {report['threads']} threads; median of {report['settings']['runs']} runs (min-max).",
        "",
        "| engine | load s | TTFT short s | TTFT long s | decode tok/s | peak RSS MB | size MB | edgeft speed-up (decode / TTFT long) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        ratio = r.get("edgeft_vs_this")
        versus = f"{ratio['decode_speed']:.2f}x / {ratio['ttft_long']:.2f}x" if ratio else "baseline"
        s, l, d = r["ttft_short_s"], r["ttft_long_s"], r["decode_tokens_per_s"]
        lines.append(
            f"| {r['name']} | {r['load_s']:.2f} | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
            f"{l['median']:.3f} ({l['min']:.3f}-{l['max']:.3f}) | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
            f"{r['peak_rss_mb']:.0f} | {r['size_bytes'] / 1e6:.1f} | {versus} |"
        )
    return lines


def chart(report: dict, path: Path) -> bool:
    """bench.png, where matplotlib is installed (the train extra has it; the base install does not)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log.info("No bench.png: matplotlib is not installed (pip install 'edgeft[train]' adds it).")
        return False
    from edgeft.plots import bar_chart

    ok = [r for r in report["results"] if "error" not in r]
    if ok:
        bar_chart(
            [r["name"].split(" (")[0] for r in ok],
            [r["decode_tokens_per_s"]["median"] for r in ok],
            path,
            title=f"Decode speed, {report['threads']} threads ({report['machine'].split(',')[0]})",
            ylabel="tokens / s",
        )
    return bool(ok)
