"""Pipeline parallelism applied from outside the model, like tensor parallelism: stage s of M
builds the single-device Llama from a config holding only its contiguous range of decoder layers,
keeps only those layers' checkpoint tensors (renumbered from 0) as the loader streams them, and
the first stage alone embeds tokens, the last alone applies the final norm and the LM head.

A step's chunks are cut into micro-batches (contiguous runs of sequences, balanced by tokens) that
flow through the stages GPipe-style, so stage s works on micro-batch m while stage s+1 works on
m-1; every rank of the engine runs `run_step` over the same micro-batches:

    stage 0 (rank 0: the engine)  embed mb0 ─ layers ─ send ──> stage 1  recv ─ layers ─ norm, logits ─┐
                                  embed mb1 ─ layers ─ send ──>          recv ─ layers ─ norm, logits ─┤
    rank 0: sample  <───────────────────────── logits of mb0, mb1, ... <─────────────────────────────────┘

With tensor parallelism too, the engine has tp*pp ranks, rank g = stage*tp + t: the ranks of one
stage form a tensor-parallel group, and TP rank t of a stage hands the (whole, all-reduced)
hidden state to TP rank t of the next. Every stage's KV cache holds only its layers.

Micro-batches live within one step: the scheduler sees one engine, so a step's sampled tokens are
exactly the single-process engine's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import InvalidConfigError
from engine.model_config import ModelConfig
from engine.parallel.tensor_parallel import split_range

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner, Step
    from engine.scheduler import ScheduledChunk

_LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class PPStage:
    """What stage `stage` of a `size`-stage pipeline owns of a model."""

    model: ModelConfig  # the whole model's config
    stage: int
    size: int

    def __post_init__(self) -> None:
        if not 1 <= self.size <= self.model.num_layers:
            raise InvalidConfigError(
                f"pipeline_parallel_size {self.size} must be between 1 and the model's number of "
                f"layers ({self.model.num_layers}): each stage holds at least one layer"
            )
        if not 0 <= self.stage < self.size:
            raise InvalidConfigError(f"stage {self.stage} is outside a pipeline of {self.size}")

    @cached_property
    def layers(self) -> range:
        return split_range(self.model.num_layers, self.size, self.stage)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.size - 1

    @cached_property
    def config(self) -> ModelConfig:
        """The single-device model this stage builds: its layers only."""
        return self.model.replace(num_layers=len(self.layers))

    def rename(self, name: str) -> str | None:
        """The Hugging Face-named checkpoint tensor `name` as this stage's model calls it, or None
        when the stage does not hold it."""
        if name.startswith(_LAYER_PREFIX):
            index, rest = name[len(_LAYER_PREFIX) :].split(".", 1)
            if int(index) not in self.layers:
                return None
            return f"{_LAYER_PREFIX}{int(index) - self.layers.start}.{rest}"
        if name == "model.embed_tokens.weight":
            # The last stage's LM head is the embedding when the two are tied.
            keep = self.first or (self.last and self.model.tie_word_embeddings)
            return name if keep else None
        if name.startswith(("model.norm.", "lm_head.")):
            return name if self.last else None
        return name  # anything else the model would reject by name

    def holds(self, name: str) -> bool:
        return self.rename(name) is not None

    def weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The loader's stream reduced to this stage's tensors, renamed."""
        for name, tensor in weights:
            renamed = self.rename(name)
            if renamed is not None:
                yield renamed, tensor


def apply_pipeline_stage(model: nn.Module, stage: PPStage) -> nn.Module:
    """Drop what a Llama model built from a PPStage's config does not run (call it on the meta
    device, before the weights exist): the embedding outside the first stage (unless it is the
    last stage's tied LM head), the final norm and the LM head outside the last."""
    if not stage.first and not (stage.last and stage.model.tie_word_embeddings):
        model.model.embed_tokens = None
    if not stage.last:
        model.model.norm = nn.Identity()
        model.lm_head = None
    return model


def split_micro_batches(chunks: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """At most `parts` contiguous runs of `chunks` (so decodes stay ahead of prefill chunks and
    sampled rows keep their order), balanced by tokens: a chunk joins the run its middle token
    falls in when the step's tokens are cut into `parts` equal stretches. Never an empty run."""
    if not chunks:
        return []
    total = sum(c.num_tokens for c in chunks)
    runs: dict[int, list[ScheduledChunk]] = {}
    done = 0
    for chunk in chunks:
        index = min(parts - 1, int((done + chunk.num_tokens / 2) * parts / total))
        runs.setdefault(index, []).append(chunk)
        done += chunk.num_tokens
    return list(runs.values())


class StageLinks:
    """One rank's point-to-point links in a pipeline: the hidden state from the previous stage's
    rank of the same TP index, to the next stage's, and (last stage, TP rank 0) the logits back to
    rank 0. Sends are asynchronous, so a stage starts the next micro-batch while the last one is in
    flight; `run_step` waits for them before it returns."""

    def __init__(self, group: dist.ProcessGroup, stage: PPStage, tp_rank: int, tp_size: int) -> None:
        self.group, self.stage = group, stage
        self.rank = stage.stage * tp_size + tp_rank
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []  # a tensor lives until its send is done

    def _recv(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int, tag: int
    ) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        self.group.recv([buffer], src, tag).wait()
        return buffer

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self._sends.append((self.group.send([tensor], dst, tag), tensor))

    def run_step(self, runner: ModelRunner, step: Step) -> torch.Tensor | None:
        """This rank's part of one step, micro-batch after micro-batch. Returns the step's logits
        (float32, in chunk order) on rank 0 (always on the first stage: there are two or more) and
        None elsewhere."""
        stage, hidden_size = self.stage, runner.config.hidden_size
        dtype, device = runner.dtype, runner.device
        gives_logits = stage.last and self.tp_rank == 0
        logits: list[torch.Tensor] = []
        try:
            for m, inputs in enumerate(step.micro_batches):
                rows = len(inputs.input_ids)
                embeds = None
                if not stage.first:
                    embeds = self._recv((rows, hidden_size), dtype, device, self.rank - self.tp_size, m)
                hidden = runner.forward(inputs, embeds=embeds)
                if not stage.last:
                    self._send(hidden, self.rank + self.tp_size, m)
                elif gives_logits:
                    self._send(runner.logits(hidden, inputs, step.every_token), 0, m)
            if self.rank == 0:
                last = (stage.size - 1) * self.tp_size
                vocab = runner.config.vocab_size
                for m, inputs in enumerate(step.micro_batches):
                    rows = len(inputs.input_ids) if step.every_token else len(inputs.sample_rows)
                    logits.append(self._recv((rows, vocab), torch.float32, device, last, m))
        finally:
            for work, _ in self._sends:
                work.wait()
            self._sends = []
        return torch.cat(logits) if self.rank == 0 else None
