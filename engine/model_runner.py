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
from engine.forward_context import AttentionMetadata, DecodeGroup, PrefillSegment, forward_context
from engine.kv_cache import CacheConfig, allocate_kv_cache
from engine.models.llama import LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import ScheduledChunk
from kernels.paged_attention import context_mask, group_by_length


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the flat batch whose hidden state gives a next token


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cache_config: CacheConfig,
        device: torch.device,
        onednn_linear: bool = True,
        sample_vocab_size: int | None = None,
        num_blocks: int | None = None,
        fan_out: Callable[[StepInputs], None] | None = None,
    ) -> None:
        """`sample_vocab_size` limits sampling to the first ids (those the tokenizer can spell).
        Tensor parallel (engine.parallel): `num_blocks` sizes the cache the same on every rank,
        and rank 0's `fan_out` hands each step's inputs to the other ranks before it runs them."""
        if device.type == "cpu":
            keep_freed_memory()  # a step's temporaries stay mapped between steps
            if onednn_linear:
                pack_linears(model)  # no-op when already packed or unavailable
        self.model = model
        self.config = model.config
        self.device = device
        self.block_size = cache_config.block_size
        dtype = next(model.parameters()).dtype
        self.kv_cache = allocate_kv_cache(self.config, cache_config, dtype, device, num_blocks)
        self.fan_out = fan_out
        self._layer_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.config.num_layers)
        ]
        self.sampler = Sampler()
        self.sample_vocab_size = sample_vocab_size or self.config.vocab_size

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
        prefills: list[PrefillSegment] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        dev = self.device
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            if chunk.num_tokens == 1 and not prefills:
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                blocks = None
                if start > 0:
                    nb = blocks_needed(end, self.block_size)
                    blocks = torch.tensor(seq.block_table[:nb], dtype=torch.long, device=dev)
                prefills.append(PrefillSegment(row, row + chunk.num_tokens, start, blocks))
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decode_tables),
            decode_groups=self._decode_groups(decode_tables, decode_lens),
            prefills=tuple(prefills),
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            metadata=metadata,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
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
        self, chunks: list[ScheduledChunk], on_layer_stored: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Logits [S, vocab] (float32) for the chunks that end their sequence, in chunk order.
        `on_layer_stored(layer)` runs as each layer's K/V land in the cache (layer-wise KV transfer)."""
        inputs = self.prepare(chunks)
        hidden = self.forward(inputs, on_layer_stored)
        return self.model.compute_logits(hidden[inputs.sample_rows]).float()

    @torch.inference_mode()
    def compute_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [T, vocab] (float32) at every token the chunks compute (perplexity evaluation)."""
        return self.model.compute_logits(self.forward(self.prepare(chunks))).float()

    @torch.inference_mode()
    def forward(
        self, inputs: StepInputs, on_layer_stored: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """The model over one step's inputs: hidden states [T, hidden], K/V stored in the cache.
        Tensor-parallel ranks other than 0 call only this, with rank 0's inputs."""
        if self.fan_out is not None:
            self.fan_out(inputs)
        metadata = inputs.metadata
        if on_layer_stored is not None:
            metadata = dataclasses.replace(metadata, on_layer_stored=on_layer_stored)
        self._bind_cache()
        with forward_context(metadata):
            return self.model(inputs.input_ids, inputs.positions)

    def execute(
        self, chunks: list[ScheduledChunk], on_layer_stored: Callable[[int], None] | None = None
    ) -> SamplerOutput | None:
        sampling = [c.seq for c in chunks if c.samples]
        logits = self.compute_logits(chunks, on_layer_stored)
        if not sampling:
            return None
        logits = logits[:, : self.sample_vocab_size]
        return self.sampler.sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
