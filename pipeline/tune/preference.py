"""Preference tuning (DPO): the training loop's step and evaluation for pairs of answers.

Each pair is a prompt with a preferred answer and one not preferred. Both sequences go in one
packed row (the prompt they share runs once: packing.collate), and the loss is DPO's sigmoid loss
as TRL computes it (loss_type "sigmoid"): -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen))
- (log p(rejected) - log p_ref(rejected)))), the log-probabilities summed over each answer's
trained tokens. The reference is the model training starts from (the base as training loaded it,
with the adapter it starts with: zero, or `--from RUN`'s), its log-probabilities computed once
before the first step and kept in the run (RUN/data/reference_logps.json), so no second copy of
the model is needed and a resumed run uses the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import math

import torch
import torch.nn.functional as F

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.chatdata import IGNORE, Pair
from edgeft.pipeline.tune.distributed import World
from edgeft.pipeline.tune.model import kept_logits
from edgeft.pipeline.tune.packing import collate, pack

REFERENCE_FILE = "reference_logps.json"


def sequence_logps(model, head, pairs: list[Pair], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[pairs, 2] twice: the summed log-probability of each pair's chosen and rejected answer, and
    how many tokens each sum has."""
    examples = [t for p in pairs for t in (p.chosen, p.rejected)]
    batch = collate(examples, device)
    head.targets = None  # the head gives the kept positions' logits
    logits = kept_logits(model, batch)[0]
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 1, batch["targets"].unsqueeze(1)).squeeze(1)
    counts = [sum(label != IGNORE for label in ex.labels[batch["shared"] + 1 :]) for ex in examples]
    sums = torch.stack([piece.sum() for piece in torch.split(token_logps, counts)])
    return sums.reshape(len(pairs), 2), torch.tensor(counts, device=sums.device).reshape(len(pairs), 2)


def dpo_losses(
    logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor, beta: float, sft_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's loss, and its reward margin: beta * the chosen answer's gain over the reference
    minus the rejected one's. With sft_weight, each pair's loss adds that times the chosen answer's
    mean token NLL (TRL's "sft" loss beside "sigmoid"): DPO alone can push both answers down and
    the model stops writing either (on samples/returns: every held-out pair ranked right, none
    written)."""
    margins = beta * ((logps[:, 0] - reference[:, 0]) - (logps[:, 1] - reference[:, 1]))
    losses = -F.logsigmoid(margins)
    if sft_weight:
        losses = losses + sft_weight * (-logps[:, 0] / counts[:, 0].clamp(min=1))
    return losses, margins.detach()


class Preference:
    """What the loop calls for a DPO run: a step's forward and backward, and the evaluation."""

    def __init__(self, run: Run, world: World, cfg, prepared):
        self.run, self.world, self.cfg, self.prepared = run, world, cfg, prepared
        self.reference: dict[str, list[list[float]]] = {}

    def prepare_reference(self, model, head, *, resumed: bool) -> None:
        """The reference log-probabilities of every training and held-out pair: computed now with
        the model as it starts, or read back (a resumed run)."""
        path = self.run.path / "data" / REFERENCE_FILE
        if resumed and path.is_file():
            self.reference = json.loads(path.read_text())
            return
        self.reference = {
            "train": self._all_logps(model, head, self.prepared.train),
            "eval": self._all_logps(model, head, self.prepared.eval),
        }
        if self.world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            artifacts.write_json_atomic(path, self.reference)

    def _all_logps(self, model, head, pairs: list[Pair]) -> list[list[float]]:
        device = self.world.accelerator.device
        out: dict[int, list[float]] = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for row in pack([len(p.input_ids) for p in pairs], list(range(len(pairs))), self.cfg.batch_tokens):
                with self.world.accelerator.autocast():
                    logps, _ = sequence_logps(model, head, [pairs[i] for i in row], device)
                out.update(zip(row, logps.tolist()))
        model.train(was_training)
        return [out[i] for i in range(len(pairs))]

    def step(self, model, head, world: World, cfg, share, pairs: list[Pair], scale: float):
        """Forward and backward over this process's rows of one step (as loop.train_step): the
        summed pair losses, the tokens, the step's pair count over all processes, and the reward
        sums for the log."""
        accelerator, device = world.accelerator, world.accelerator.device
        rows = [row for row in share if row is not None]
        stand_in = rows[0] if rows else None
        count = world.sum(sum(len(r) for r in rows))[0]
        total, tokens, margin_sum, right = 0.0, 0, 0.0, 0
        for n, row in enumerate(share):
            real = row is not None
            picked = row or stand_in or [0]
            sync = contextlib.nullcontext() if n == len(share) - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    logps, counts = sequence_logps(model, head, [pairs[i] for i in picked], device)
                reference = torch.tensor([self.reference["train"][i] for i in picked], device=logps.device)
                losses, margins = dpo_losses(logps, counts, reference, cfg.beta, cfg.sft_weight)
                weight = scale / max(count, 1) if real else 0.0
                accelerator.backward(losses.sum() * weight)
            if real:
                total += losses.sum().item()
                tokens += sum(len(pairs[i].input_ids) for i in picked)
                margin_sum += margins.sum().item()
                right += int((margins > 0).sum().item())
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(list(model.parameters()), cfg.max_grad_norm)
        margin_sum, right = world.sum(margin_sum, right)
        return (
            total,
            tokens,
            count,
            {"reward_margin": margin_sum / max(count, 1), "reward_accuracy": right / max(count, 1)},
        )

    def evaluate(self, model, head, world: World, pairs: list[Pair], batch_tokens: int) -> tuple[float, dict]:
        """Mean DPO loss over the held-out pairs, with their mean reward margin and how often the
        preferred answer gained more than the other (preference accuracy)."""
        device = world.accelerator.device
        rows = pack([len(p.input_ids) for p in pairs], list(range(len(pairs))), batch_tokens)
        passes = math.ceil(len(rows) / world.size)
        mine = rows[world.rank :: world.size]
        model.eval()
        total, margin_sum, right, count = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for n in range(passes):
                real = n < len(mine)
                row = mine[n] if real else rows[0]
                with world.accelerator.autocast():
                    logps, counts = sequence_logps(model, head, [pairs[i] for i in row], device)
                reference = torch.tensor([self.reference["eval"][i] for i in row], device=logps.device)
                losses, margins = dpo_losses(logps, counts, reference, self.cfg.beta, self.cfg.sft_weight)
                if real:
                    total += losses.sum().item()
                    margin_sum += margins.sum().item()
                    right += int((margins > 0).sum().item())
                    count += len(row)
        model.train()
        total, margin_sum, right, count = world.sum(total, margin_sum, right, count)
        count = max(count, 1)
        return total / count, {"eval_reward_margin": margin_sum / count, "eval_reward_accuracy": right / count}
