"""Everything that touches tensors in a step: pack the scheduled chunks into one flat batch, run
the model over the paged KV cache, compute logits only where a token is sampled, and sample."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.block_manager import blocks_needed
from engine.cpu_allocator import keep_freed_memory
from engine.cpu_linear import pack_linears
from engine.cuda_graphs import DecodeGraphs
from engine.forward_context import AttentionMetadata, DecodeGroup, PagedBatch, PrefillSegment, forward_context
from engine.kv_cache import CacheConfig, allocate_kv_cache
from engine.models.llama import LlamaForCausalLM
from engine.parallel.pipeline import StageLinks, split_micro_batches
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import ScheduledChunk
from kernels.paged_attention import context_mask, group_by_length


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the flat batch whose hidden state gives a next token


@dataclass(frozen=True)
class Step:
    """One step as every rank of an engine runs it: its micro-batches in chunk order (one unless
    the engine has pipeline stages), and whether logits are wanted at every row (perplexity) or
    only at the sampled ones."""

    micro_batches: tuple[StepInputs, ...]
    every_token: bool = False
    # (request id, its blocks) of the requests whose prefill ends in this step, when rank 0 sends
    # their KV layer by layer: every rank's `layer_hook` sends its own part of each as it is stored
    hooked: tuple[tuple[str, tuple[int, ...]], ...] = ()


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cache_config: CacheConfig,
        device: torch.device,
        onednn_linear: bool = True,
        sample_vocab_size: int | None = None,
        num_blocks: int | None = None,
        fan_out: Callable[[Step], None] | None = None,
        paged_attention: bool = False,
        links: StageLinks | None = None,
    ) -> None:
        """`sample_vocab_size` limits sampling to the first ids (those the tokenizer can spell).
        Tensor and pipeline parallel (engine.parallel): `num_blocks` sizes the cache the same on
        every rank, rank 0's `fan_out` hands each step to the other ranks before it runs it, and
        `links` are this rank's pipeline hand-offs (None with one stage).
        `paged_attention`: attention metadata for the paged kernels (EngineConfig.attention_backend)."""
        if device.type == "cpu":
            keep_freed_memory()  # a step's temporaries stay mapped between steps
            if onednn_linear:
                pack_linears(model)  # no-op when already packed or unavailable
        self.model = model
        self.config = model.config
        self.device = device
        self.block_size = cache_config.block_size
        self.dtype = next(model.parameters()).dtype
        self.kv_cache = allocate_kv_cache(self.config, cache_config, self.dtype, device, num_blocks)
        self.fan_out = fan_out
        self.links = links
        self.paged_attention = paged_attention
        self.graphs: DecodeGraphs | None = None  # enable_cuda_graphs
        self._layer_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.config.num_layers)
        ]
        self.sampler = Sampler()
        self.sample_vocab_size = sample_vocab_size or self.config.vocab_size
        # Ranks other than 0 of a tensor-parallel prefill engine: called as each layer's K/V are
        # stored with the step's `hooked` requests (installed by the rank's KV service)
        self.layer_hook: Callable[[list[tuple[str, list[int]]], int], None] | None = None

    def _bind_cache(self) -> None:
        # Bound per step, not once: engines built over one loaded model (tests, benchmarks) stay correct.
        layers = zip(self.model.attention_layers(), self._layer_caches, strict=True)
        for i, (attn, (k, v)) in enumerate(layers):
            attn.k_cache, attn.v_cache, attn.layer_idx = k, v, i

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.shape[2]

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        """Chunks arrive decodes first (one token each), then prefill chunks."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decodes: list[tuple[list[int], int]] = []  # (block table, context length)
        prefills: list[tuple[list[int], int, int, int]] = []  # (block table, first row, length, prefix)
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            if chunk.num_tokens == 1 and not prefills:
                decodes.append((seq.block_table, end))
            else:
                prefills.append(
                    (seq.block_table[: blocks_needed(end, self.block_size)], row, chunk.num_tokens, start)
                )
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
        slot_mapping = self._upload(torch.tensor(slots, dtype=torch.long))
        if self.paged_attention:
            metadata = AttentionMetadata(
                slot_mapping, len(decodes), (), (), self._paged_batch(decodes, prefills)
            )
        else:
            metadata = AttentionMetadata(
                slot_mapping=slot_mapping,
                num_decodes=len(decodes),
                decode_groups=self._decode_groups([t for t, _ in decodes], [n for _, n in decodes]),
                prefills=tuple(self._prefill_segment(*p) for p in prefills),
            )
        return StepInputs(
            input_ids=self._upload(torch.tensor(ids, dtype=torch.long)),
            positions=self._upload(torch.tensor(positions, dtype=torch.long)),
            metadata=metadata,
            sample_rows=self._upload(torch.tensor(sample_rows, dtype=torch.long)),
        )

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A step input on the device: on CUDA through pinned memory, without waiting for the copy."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _prefill_segment(self, table: list[int], row: int, length: int, prefix: int) -> PrefillSegment:
        blocks = None if prefix == 0 else torch.tensor(table, dtype=torch.long, device=self.device)
        return PrefillSegment(row, row + length, prefix, blocks)

    def _paged_batch(
        self, decodes: list[tuple[list[int], int]], prefills: list[tuple[list[int], int, int, int]]
    ) -> PagedBatch:
        def tables(rows: list[list[int]]) -> torch.Tensor:
            width = max(map(len, rows), default=0)
            padded = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
            return self._upload(padded.view(len(rows), width))

        def column(values: list[int]) -> torch.Tensor:
            return self._upload(torch.tensor(values, dtype=torch.int32))

        return PagedBatch(
            decode_tables=tables([t for t, _ in decodes]),
            decode_lens=column([n for _, n in decodes]),
            prefill_tables=tables([p[0] for p in prefills]),
            prefill_starts=column([p[1] for p in prefills]),
            prefill_lens=column([p[2] for p in prefills]),
            prefill_prefixes=column([p[3] for p in prefills]),
            max_prefill_len=max((p[2] for p in prefills), default=0),
        )

    def _decode_groups(self, tables: list[list[int]], lens: list[int]) -> tuple[DecodeGroup, ...]:
        if not tables:
            return ()
        dev, bs = self.device, self.block_size
        widths = [blocks_needed(n, bs) for n in lens]
        groups = []
        for rows in group_by_length([w * bs for w in widths]):
            width = max(widths[r] for r in rows)
            padded = [tables[r][:width] + [0] * (width - min(len(tables[r]), width)) for r in rows]
            lens_t = torch.tensor([lens[r] for r in rows], dtype=torch.long, device=dev)
            whole = len(rows) == len(tables)  # one group: every row, in order
            groups.append(
                DecodeGroup(
                    rows=None if whole else torch.tensor(rows, dtype=torch.long, device=dev),
                    block_tables=torch.tensor(padded, dtype=torch.long, device=dev),
                    valid=context_mask(lens_t, width * bs),
                )
            )
        return tuple(groups)

    @torch.inference_mode()
    def compute_logits(
        self,
        chunks: list[ScheduledChunk],
        on_layer_stored: Callable[[int], None] | None = None,
        hooked: tuple[tuple[str, tuple[int, ...]], ...] = (),
    ) -> torch.Tensor:
        """Logits [S, vocab] (float32) for the chunks that end their sequence, in chunk order.
        `on_layer_stored(layer)` runs as each layer's K/V land in the cache (layer-wise KV transfer);
        `hooked` tells the other ranks whose KV their own layer hooks send."""
        return self._run(chunks, False, on_layer_stored, hooked)

    @torch.inference_mode()
    def compute_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [T, vocab] (float32) at every token the chunks compute (perplexity evaluation)."""
        return self._run(chunks, True, None)

    def _run(
        self,
        chunks: list[ScheduledChunk],
        every_token: bool,
        on_layer_stored: Callable[[int], None] | None,
        hooked: tuple[tuple[str, tuple[int, ...]], ...] = (),
    ) -> torch.Tensor:
        if self.links is None:
            inputs = self.prepare(chunks)
            if self.fan_out is not None:
                self.fan_out(Step((inputs,), every_token, hooked if on_layer_stored is not None else ()))
            return self.logits(self.forward(inputs, on_layer_stored), inputs, every_token)
        if on_layer_stored is not None:
            raise ValueError(
                "layer-wise hooks need every layer in this process; an engine with pipeline stages "
                "keeps later layers in other ranks"
            )
        runs = split_micro_batches(chunks, self.links.stage.size)
        step = Step(tuple(self.prepare(run) for run in runs), every_token)
        if self.fan_out is not None:
            self.fan_out(step)
        return self.links.run_step(self, step)

    @torch.inference_mode()
    def run_step(self, step: Step) -> None:
        """Ranks other than 0: run rank 0's step (their part of it; rank 0 samples)."""
        if self.links is not None:
            self.links.run_step(self, step)
            return
        hook, hooked = self.layer_hook, [(rid, list(blocks)) for rid, blocks in step.hooked]
        for inputs in step.micro_batches:  # one: without pipeline stages the step is not cut
            self.forward(inputs, (lambda layer: hook(hooked, layer)) if hook and hooked else None)

    def logits(self, hidden: torch.Tensor, inputs: StepInputs, every_token: bool) -> torch.Tensor:
        """Float32 logits at the sampled rows of `hidden` (every row with `every_token`)."""
        return self.model.compute_logits(hidden if every_token else hidden[inputs.sample_rows]).float()

    @torch.inference_mode()
    def forward(
        self,
        inputs: StepInputs,
        on_layer_stored: Callable[[int], None] | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model (this rank's layers of it) over one step's inputs: hidden states [T, hidden],
        K/V stored in the cache. `embeds`: the previous pipeline stage's output, in place of the
        token embeddings."""
        metadata = inputs.metadata
        self._bind_cache()
        eager = embeds is not None or on_layer_stored is not None or self.graphs is None
        if not eager and self.graphs.can_run(metadata):
            return self.graphs.run(inputs.input_ids, inputs.positions, metadata)
        if on_layer_stored is not None:
            metadata = dataclasses.replace(metadata, on_layer_stored=on_layer_stored)
        with forward_context(metadata):
            return self.model(inputs.input_ids, inputs.positions, inputs_embeds=embeds)

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, capture: bool = True) -> None:
        """Replay decode-only steps of up to `max_batch` sequences from CUDA graphs (engine/cuda_graphs.py);
        needs paged attention. `capture=False` runs the same padded static batches eagerly (the CPU
        tests of the padding and bucketing)."""
        if not self.paged_attention:
            raise ValueError("CUDA graphs need paged attention (EngineConfig.attention_backend)")
        self._bind_cache()
        max_blocks = blocks_needed(max_model_len, self.block_size)
        self.graphs = DecodeGraphs(self.model, max_batch, max_blocks, self.device, capture)

    def execute(
        self,
        chunks: list[ScheduledChunk],
        on_layer_stored: Callable[[int], None] | None = None,
        hooked: tuple[tuple[str, tuple[int, ...]], ...] = (),
    ) -> SamplerOutput | None:
        sampling = [c.seq for c in chunks if c.samples]
        logits = self.compute_logits(chunks, on_layer_stored, hooked)
        if not sampling:
            return None
        logits = logits[:, : self.sample_vocab_size]
        return self.sampler.sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
