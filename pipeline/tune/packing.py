"""Packing: whole examples into rows with no padding, rows into optimizer steps, steps into shares.

A step is the same list of rows whatever the number of processes: with N processes each trains on
its own `grad_accum` rows of a step of N x `grad_accum` rows, so an N-process run replays a
one-process run with N times the gradient accumulation, in the same order.
"""

from __future__ import annotations

import math
import random

from edgeft.chatdata import IGNORE, Tokenized
from edgeft.fidelity import common_start
from edgeft.pipeline.config import TuneConfig


def pack(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Fill rows of up to `capacity` tokens with whole examples, in the given order (no padding)."""
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


class Plan:
    """Which packed rows each optimizer step sees, fixed by the seed, so a resumed run replays it."""

    def __init__(self, lengths: list[int], cfg: TuneConfig, world: int = 1):
        self.lengths, self.cfg, self.world = lengths, cfg, world
        self.rows_per_step = cfg.grad_accum * world
        self.epochs = math.ceil(cfg.epochs)
        full = [len(self.steps(e)) for e in range(self.epochs)]
        if cfg.epochs != self.epochs:  # a fractional last epoch
            full[-1] = max(1, round(full[-1] * (cfg.epochs - self.epochs + 1)))
        self.steps_per_epoch = full
        total = sum(full)
        self.total = min(total, cfg.max_steps) if cfg.max_steps else total

    def rows(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        random.Random(self.cfg.seed * 1000 + epoch).shuffle(order)
        return pack(self.lengths, order, self.cfg.batch_tokens)

    def steps(self, epoch: int) -> list[list[list[int]]]:
        """Optimizer steps of one epoch: each a list of `grad_accum` x world rows of example indices."""
        rows, k = self.rows(epoch), self.rows_per_step
        return [rows[i : i + k] for i in range(0, len(rows), k)]

    def share(self, step: list[list[int]], rank: int) -> list[list[int] | None]:
        """This process's `grad_accum` rows of a step; None where the step ran short (the last one).

        Every process runs the same number of micro-batches, so collective engines (FSDP, ZeRO-3)
        stay in step; a None is run as a zero-weight pass.
        """
        k = self.cfg.grad_accum
        mine = step[rank * k : (rank + 1) * k]
        return mine + [None] * (k - len(mine))


SHARED_MIN = 8  # a row's examples that begin with at least this many identical untrained tokens run them once


def collate(examples: list[Tokenized], device, share: bool | None = None) -> dict:
    """One packed row: ids, per-example positions, example lengths, next-token targets.

    Targets are shifted inside each example, so no token learns from its neighbour's text, and only
    trained positions go through the output head (`logits_to_keep`): the 49k-wide vocabulary
    projection is the costliest layer of a small model.

    `share`: what every example of the row begins with (a system prompt: a quarter of each recipe
    example) comes once, first, and each example continues from it (`shared` tokens; packed
    attention lets every example see them). Causal attention makes those tokens' states the same in
    every example, so the loss and its gradients are the same as with each example whole. Off on
    CUDA by default (None), whose variable-length attention kernel takes whole examples only.
    """
    import torch

    if share is None:
        share = torch.device(device).type != "cuda"
    shared = shared_prefix(examples) if share else 0
    ids, positions, targets = list(examples[0].input_ids[:shared]), list(range(shared)), [IGNORE] * shared
    for ex in examples:
        ids += ex.input_ids[shared:]
        positions += range(shared, len(ex.input_ids))
        targets += ex.labels[shared + 1 :] + [IGNORE]
    targets_t = torch.tensor(targets, device=device)
    keep = (targets_t != IGNORE).nonzero().squeeze(1)
    return {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": torch.tensor([positions], device=device),
        "segments": [len(ex.input_ids) - shared for ex in examples],
        "shared": shared,
        "keep": keep,
        "targets": targets_t[keep],
        "tokens": sum(len(ex.input_ids) for ex in examples),
    }


def shared_prefix(examples: list[Tokenized]) -> int:
    """How many leading tokens every example shares and trains on none of (0 when under SHARED_MIN
    or a single example): each keeps at least one token of its own, and a shared token's target
    (the next token) is untrained in every example."""
    n = common_start([ex.input_ids for ex in examples])
    for ex in examples:
        n = min(n, next((i for i, label in enumerate(ex.labels[1 : n + 1]) if label != IGNORE), n))
    return n if n >= SHARED_MIN else 0
