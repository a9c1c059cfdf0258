"""The fine-tune's configuration: each field carries its help text; the CLI options are built from it.

Precedence: defaults < `--config FILE.toml` < command-line flags (edgeft.config.load_config). The
resolved config is saved in the run manifest, so a run can always be reproduced or resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from edgeft.config import check_choices, opt
from edgeft.errors import ConfigError


@dataclass
class TuneConfig:
    """Everything `edgeft tune` needs. Defaults suit a ~100M-4B model on one CPU or GPU."""

    TOML_SECTION: ClassVar[str] = "tune"

    model: str = opt("smollm2-135m", "Base model: built-in name, HF folder, .gguf file or Hub id.")
    data: str = opt("", "Training data: JSONL or JSON array (chat, alpaca, prompt/completion or text).")
    eval_file: str = opt("", "Held-out data for eval loss/perplexity (same formats as --data).")
    val_split: float = opt(
        0.1,
        "Without --eval-file, hold out this fraction of --data (at most 200 examples, only from 100 examples up) for "
        "eval loss, the best checkpoint, and the merge's and export's checks. 0 = train on all.",
    )
    format: str = opt(
        "auto",
        "Data format; auto detects it from the keys.",
        choices=("auto", "chat", "alpaca", "completion", "text", "preference"),
    )
    output: str = opt("", "Run directory to create (default: runs/<data name>-<method>).")
    method: str = opt(
        "qlora",
        "qlora = 4-bit NF4 base + LoRA (least memory); lora = full-precision base; dora = weight-decomposed LoRA; "
        "dpo = preference tuning on qlora (preference data trains with DPO whatever the method).",
        choices=("qlora", "lora", "dora", "dpo"),
    )
    lora_r: int = opt(16, "LoRA rank: higher = more capacity, more memory.")
    lora_alpha: int = opt(32, "LoRA scaling numerator (the update is scaled by alpha/r).")
    lora_dropout: float = opt(
        0.0, "Dropout on the LoRA input. 0 is 1.4x faster on CPU (no random masks) and fine for 1-3 epochs."
    )
    target_modules: str = opt(
        "all-linear", "Comma-separated module names to adapt, or all-linear (every linear layer but the output head)."
    )
    epochs: float = opt(
        0.0,
        "Passes over the training data (fractions allowed). 0 = auto: up to 5 when there is validation data "
        "(--eval-file or the split; the run stops early when the eval loss stops falling, see --patience), else 3.",
    )
    patience: int = opt(
        1,
        "With validation data: stop when this many evaluations in a row do not lower the best eval loss "
        "(0 = never stop early). The best checkpoint is kept either way.",
    )
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = run all epochs). The schedule follows it.")
    start_from: str = opt(
        "",
        "Start from this run's adapter (an earlier `edgeft tune` run on the same base model, with the same LoRA settings): "
        "preference tuning after supervised fine-tuning, or more training.",
        flag="--from",
    )
    beta: float = opt(
        0.1, "Preference data (DPO): how far from the model it starts the preferences may pull it; lower = further."
    )
    sft_weight: float = opt(
        1.0,
        "Preference data (DPO): weight of the preferred answers' own loss (mean token NLL) added to DPO's, which "
        "keeps the model writing them (TRL's loss_type sft beside sigmoid); 0 = DPO's loss alone.",
    )
    learning_rate: float = opt(2e-4, "Peak learning rate.", flag="--lr")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.05, "Fraction of steps spent warming the learning rate up from 0.")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = off).")
    max_seq_len: int = opt(1024, "Examples longer than this many tokens are truncated (data check reports how many).")
    batch_tokens: int = opt(
        1024, "Tokens per step: examples are packed into one row up to this length, with no padding."
    )
    grad_accum: int = opt(1, "Steps of gradients to accumulate before each optimizer update.")
    train_on_prompt: bool = opt(
        False, "Also train on system/user tokens (default: only assistant turns and their end-of-turn token)."
    )
    eval_every: int = opt(
        0,
        "Also evaluate every N optimizer steps (0 = once per epoch; -1 = never: --eval-file then only serves the merge's and export's checks against the model as trained).",
    )
    save_every: int = opt(50, "Write a resumable checkpoint every N optimizer steps (and always on Ctrl-C).")
    seed: int = opt(42, "Seed for data order, dropout and LoRA initialisation.")
    device: str = opt("auto", "Where to train: auto picks CUDA when available.", choices=("auto", "cpu", "cuda"))
    precision: str = opt(
        "auto",
        "Compute precision; auto = bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    threads: int = opt(0, "CPU threads for torch (0 = all cores).")
    gradient_checkpointing: str = opt(
        "auto",
        "Recompute activations in backward: ~3x less memory, ~30% slower. auto = on for CUDA, and on CPU when activations would need over a quarter of the RAM.",
        choices=("auto", "on", "off"),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail on the first bad value, naming the field, the value and what is allowed."""
        checks = [
            ("lora_r", self.lora_r >= 1, "a positive integer"),
            ("lora_alpha", self.lora_alpha > 0, "positive"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)"),
            ("epochs", self.epochs >= 0, "0 (auto) or more"),
            ("patience", self.patience >= 0, "0 or more"),
            ("beta", self.beta > 0, "positive"),
            ("sft_weight", self.sft_weight >= 0, "0 or more"),
            ("max_steps", self.max_steps >= 0, "0 or more"),
            ("learning_rate", 0 < self.learning_rate < 1, "in (0, 1)"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 or more"),
            ("max_seq_len", self.max_seq_len >= 16, "at least 16"),
            ("batch_tokens", self.batch_tokens >= 16, "at least 16"),
            ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("val_split", 0.0 <= self.val_split <= 0.5, "in [0, 0.5]"),
            ("eval_every", self.eval_every >= -1, "0 or more, or -1 (never)"),
            ("save_every", self.save_every >= 1, "at least 1"),
            ("threads", self.threads >= 0, "0 or more"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is invalid: it must be {allowed}.")
        check_choices(self)
        if self.batch_tokens < self.max_seq_len:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens}) is smaller than max_seq_len ({self.max_seq_len}): "
                "one full-length example must fit in a step. Raise --batch-tokens or lower --max-seq-len."
            )

    # --epochs 0 (auto). With validation data the eval loss picks the checkpoint and stops the run, so
    # it may run longer: on the task suite's runs the eval loss still fell 25% to 43% over the third of
    # three epochs on four of five tasks, and the intents task answered 62.0 (3 epochs, three seeds)
    # against 69.5 (5 epochs, two seeds) on its unseen phrasings. Without validation data nothing
    # tells an overfit run apart, so it stays at 3.
    AUTO_EPOCHS: ClassVar[float] = 3.0
    AUTO_EPOCHS_VALIDATED: ClassVar[float] = 5.0

    def resolve_epochs(self, validated: bool) -> None:
        """Fix --epochs 0 (auto) before training; the run's saved config keeps the number it ran with."""
        if not self.epochs:
            self.epochs = self.auto_epochs(validated)

    def auto_epochs(self, validated: bool) -> float:
        return self.AUTO_EPOCHS_VALIDATED if validated and self.eval_every >= 0 else self.AUTO_EPOCHS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
