"""Decode-only steps replayed from CUDA graphs.

A decode step launches the same few hundred kernels every time, only over other values; at small
batches launching them costs more than running them. So each batch-size bucket is captured once,
and a step copies its inputs into the static buffers the graph reads and replays it:

    bucket B = the smallest of 1, 2, 4, 8, 16, 24, ..., max_batch holding the step's n sequences
    static buffers (max_batch rows): input_ids, positions, slots, block tables [., max_blocks], lengths
    rows n .. B-1 (padding): slot -1 (nothing stored), length 0 (attention gives zeros)

Every launch inside is sized by the bucket, never by a device value (the decode kernel's split count
comes from the bucket and the tables' width), so nothing in a step waits for the GPU. With
`capture=False` the same padded buffers run eagerly, which is how the CPU tests cover the padding.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import AttentionMetadata, PagedBatch, forward_context


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8 and multiples of 8, then `max_batch` itself."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return sorted({*small, *range(8, max_batch, 8), max_batch})


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, max_batch: int, max_blocks: int, device: torch.device, capture: bool = True
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # each graph's hidden states [B, hidden]
        if capture:
            self._capture()

    def _forward(self, batch: int) -> torch.Tensor:
        none = self.lens[:0]
        paged = PagedBatch(self.tables[:batch], self.lens[:batch], self.tables[:0], none, none, none, 0)
        with forward_context(AttentionMetadata(self.slots[:batch], batch, (), (), paged)):
            return self.model(self.input_ids[:batch], self.positions[:batch])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.buckets):  # the largest first: the smaller ones reuse its memory
            self._forward(batch)  # warm-up: compiles the kernels, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self._forward(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def can_run(self, metadata: AttentionMetadata) -> bool:
        """A decode-only paged step that fits the buffers."""
        paged = metadata.paged
        return (
            paged is not None
            and paged.prefill_starts.shape[0] == 0
            and 0 < metadata.num_decodes <= self.buckets[-1]
            and paged.decode_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of a step `can_run` accepted."""
        n, paged = metadata.num_decodes, metadata.paged
        batch = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(metadata.slot_mapping)
        self.slots[n:batch].fill_(-1)
        self.lens[:n].copy_(paged.decode_lens)
        self.lens[n:batch].zero_()
        self.tables[:n, : paged.decode_tables.shape[1]].copy_(paged.decode_tables)
        graph = self.graphs.get(batch)
        if graph is None:
            return self._forward(batch)[:n]
        graph.replay()
        return self.outputs[batch][:n]
