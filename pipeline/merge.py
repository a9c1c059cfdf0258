"""edgeft merge: fold the adapter into the base weights exactly as training saw them.

QLoRA trains the adapter against the NF4-rounded base, not the original weights; on a small model
that rounding is large and the adapter learns to work with it, so adding it to the original
weights gives a different model (measured: 23/40 exact answers instead of 40/40). The merge
therefore rebuilds the base the way training loaded it (same storage dtype, same NF4 codes),
dequantizes it, keeps it in fp32 (never quantizing it again) and adds the adapter's delta there.
Then it checks the merged model against the model as trained (NF4 base + adapter, through
bitsandbytes and peft) and refuses a drift, unless the user accepts it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from edgeft import artifacts, fidelity
from edgeft.artifacts import Run
from edgeft.errors import ConfigError, RunError
from edgeft.trained import Trained, as_trained_model, dequantized, load_base, save_merged, tokenizer_of, with_adapter

log = logging.getLogger(__name__)

BASE_WEIGHTS = ("as-trained", "original")
MERGE_CHECK_SAMPLES = 24


def open_tuned_run(path: str | Path) -> Run:
    """A run whose adapter exists; otherwise say which command makes it."""
    run = Run.open(path)
    record = run.tune_record()
    if not (run.adapter_dir / "adapter_config.json").is_file():
        status = record.status if record else "not started"
        hint = f"edgeft tune --resume {run.path}" if status in ("interrupted", "running") else "edgeft tune"
        raise RunError(f"run {run.path} has no adapter yet (training is {status}). Finish it with: {hint}")
    return run


def merge(
    path: str | Path, *, force: bool = False, base_weights: str = "as-trained", allow_drift: bool = False
) -> Path:
    """Merge the run's adapter into its base model as trained; returns the merged folder.

    Raises DriftError (after writing the folder and recording why) when the merged model does not
    behave like the model as trained and `allow_drift` is not set.
    """
    if base_weights not in BASE_WEIGHTS:
        raise ConfigError(f"base_weights = {base_weights!r} is invalid: choose one of {', '.join(BASE_WEIGHTS)}.")
    run = open_tuned_run(path)
    with run.lock("merge"):
        return _merge(run, force=force, base_weights=base_weights, allow_drift=allow_drift)


def _merge(run: Run, *, force: bool, base_weights: str, allow_drift: bool) -> Path:
    target = run.merged_dir
    if run.has_merged() and not force:  # a folder without a record is a leftover: replaced
        raise RunError(f"{target} already exists. Pass --force to merge again.")
    trained = Trained.of(run)
    artifacts.check_free_space(run.path, artifacts.dir_size(trained.base) * 2, "merging")
    start = time.perf_counter()
    tokenizer = tokenizer_of(trained)
    # The model as trained is scored first and then becomes the merged model: the base loads once,
    # and only one full-size model is ever in memory.
    as_trained = as_trained_model(trained)
    reference = reference_answers(run, as_trained, tokenizer)
    if base_weights == "original":  # another base: free this one before it loads
        as_trained = None
    merged = merged_model(trained, base_weights=base_weights, as_trained=as_trained)
    as_trained = None
    # Checked before it is written, so merged/ never holds a model the manifest has no verdict on.
    check = check_merged(reference, merged, tokenizer, allow_drift=allow_drift)
    record = {
        "status": "done" if check["gate"]["passed"] or allow_drift else "drift",
        "path": target.name,
        "base_weights": base_weights,
        "fidelity": check,
    }
    with artifacts.staged_dir(target, force=True, what="merged model") as tmp:
        save_merged(merged, tokenizer, tmp)
        # the record goes in with the folder, in the same rename: merged/ is never seen without it
        artifacts.write_json_atomic(tmp / artifacts.MERGE_RECORD, record)
    log.info(f"Merged {run.adapter_dir} into {trained.base.name} ({base_weights} base weights) -> {target}")
    seconds = time.perf_counter() - start
    run.record_stage(
        "merge",
        **record,
        size_bytes=artifacts.dir_size(target),
        seconds=round(seconds, 1),
        finished_at=artifacts.now(),
    )
    if not check["gate"]["passed"] and not allow_drift:
        for line in fidelity.table(check):
            log.info(line)
        advice = (
            "Merge with the default --base-weights as-trained."
            if base_weights != "as-trained"
            else ("This is unexpected for an as-trained merge: please report it with the run's edgeft.json.")
        )
        raise fidelity.DriftError(
            fidelity.drift_message("The merged model", str(target), check["gate"]["problems"], advice)
        )
    return target


def reference_answers(run: Run, as_trained, tokenizer) -> fidelity.Recorded:
    """What the model as trained answers on the run's own prompts (held-out data first, then training
    data; teacher-forced), kept for the check."""
    from edgeft.chatdata import reference_pairs, stop_ids

    pairs = reference_pairs(tokenizer, run.tune_record().check_files(), MERGE_CHECK_SAMPLES)
    stops = set(stop_ids(tokenizer))
    scorer = fidelity.TorchScorer(as_trained, tokenizer.pad_token_id)
    return fidelity.Recorded(scorer, pairs, stops, progress="scoring the model as trained")


def check_merged(reference: fidelity.Recorded, merged, tokenizer, *, allow_drift: bool) -> dict:
    """The merged model against the model as trained's recorded answers."""
    start = time.perf_counter()
    candidate = fidelity.TorchScorer(merged, tokenizer.pad_token_id)
    result = fidelity.compare(reference, candidate, reference.pairs, reference.stops, progress="checking the merge")
    result["gate"] = fidelity.gate_record(result, fidelity.MERGE_GATE, allow_drift=allow_drift)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def merged_model(trained: Trained, *, base_weights: str = "as-trained", as_trained=None):
    """The adapter folded into the base as trained (or the original fp32 weights), in fp32.

    `as_trained` (the model as trained, already loaded) is consumed: for QLoRA its NF4 layers are
    dequantized in place (NF4 codes x block scales in fp32, as `load_base` does) and the adapter is
    folded in there; peft's own merge on a 4-bit base would quantize the sum again.
    """
    import torch

    if base_weights == "original":
        base = load_base(replace(trained, method="lora", precision="fp32"))
        model = with_adapter(base, trained).merge_and_unload()
    else:
        as_trained = as_trained if as_trained is not None else as_trained_model(trained)
        if trained.method == "qlora":
            model = with_adapter(dequantized(as_trained.unload()), trained).merge_and_unload()
        else:
            model = as_trained.merge_and_unload()
    return model.to(torch.float32).eval()
