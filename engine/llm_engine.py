"""The colocated engine: continuous batching of prefill chunks and decodes in one process.

    add_request ──> Scheduler.waiting ──schedule()──> ModelRunner.execute() ──> _postprocess()
                         ^                                                          │
                         └──────────── preempted (recompute) ◄── running ◄──────────┘
                                                              finished ──> blocks freed

A step is three lines: schedule, run, postprocess. It is the offline API's engine and the
colocated baseline the disaggregated cluster is measured against; the same loop runs both halves
of a disaggregated deployment, by role:

    colocated  prefill and decode here (the default)
    prefill    a request ends here with its first token: finish_reason "prefilled" and its KV
               blocks in `kv_blocks`, now the caller's (the KV sender frees them once decode has
               them); a request its first token already finished ("stop"/"length") also hands
               its blocks over, for the caller to free
    decode     `add_prefilled` adopts a request whose prompt KV arrived in this cache's blocks
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

from engine.block_manager import blocks_needed
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_config import EngineConfig
from engine.errors import (
    InvalidPromptError,
    PDServeError,
    PromptTooLongError,
    TokenizerUnavailableError,
)
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput, RequestTimeline
from engine.parallel.rank_service import RankServiceFactory
from engine.parallel.ranks import ParallelRanks, RankLauncher, RankPlace, load_rank
from engine.sampler import SamplerOutput, make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler
from engine.sequence import Sequence

Prompt = str | Seq[int]
ROLES = ("colocated", "prefill", "decode")
# Prefill role, layer-wise KV transfer: called as each layer's K/V land in the cache with the
# (request id, KV blocks) of every request whose prefill completes in this step.
LayerHook = Callable[[list[tuple[str, list[int]]], int], None]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        role: str = "colocated",
        rank_service: RankServiceFactory | None = None,
        rank_launcher: RankLauncher | None = None,
    ) -> None:
        """`loaded` reuses a model already in memory (its attention layers are rebound to this
        engine's KV cache at every step, so engines sharing one model must step in turn).
        `rank_service`: what every rank beyond 0 of a parallel engine runs beside its steps,
        reachable as `ranks.services` (engine/parallel/rank_service.py). `rank_launcher`: who
        starts those ranks (the cluster's Ray actors); by default processes spawned here."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.config = config
        device = config.torch_device
        self.ranks = None  # tensor/pipeline parallel: ranks 1 .. N-1 (this process is rank 0)
        links = None
        if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
            if loaded is not None:
                raise ValueError("a parallel engine loads its own shards; do not pass `loaded`")
            self.ranks = ParallelRanks(config, rank_service, rank_launcher)
            try:
                loaded, num_blocks, links = load_rank(config, RankPlace.of(config, 0), self.ranks.groups)
            except BaseException:
                self.ranks.close()
                raise
            num_blocks = self.ranks.agree_num_blocks(num_blocks)
        else:
            loaded = loaded or load_model(config.model, config.torch_dtype, device, seed=config.seed)
            num_blocks = None
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_model_len, loaded.config.max_model_len
        )
        # Ids the model can embed and the tokenizer can spell; models often pad their vocabulary
        # past the tokenizer's (Qwen2.5: 152064 rows, 151665 tokens), and those rows are never sampled.
        self.vocab_size = loaded.config.vocab_size
        if self.tokenizer is not None:
            self.vocab_size = min(self.vocab_size, self.tokenizer.vocab_size)
        self.runner = ModelRunner(
            loaded.model,
            config.cache,
            device,
            onednn_linear=config.onednn_linear,
            sample_vocab_size=self.vocab_size,
            num_blocks=num_blocks,
            fan_out=None if self.ranks is None else self.ranks.send,
            paged_attention=config.paged_attention,
            links=links,
        )
        if config.cuda_graphs and device.type == "cuda" and config.paged_attention and self.ranks is None:
            self.runner.enable_cuda_graphs(config.max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, self.runner.num_blocks, config.block_size)
        self.eos_token_ids = frozenset(loaded.config.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id]
            if self.tokenizer and self.tokenizer.eos_token_id is not None
            else []
        )
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._texts: dict[str, str] = {}
        self._errors: dict[str, PDServeError] = {}
        self._handed_off: dict[str, list[int]] = {}  # prefill role: KV blocks for the next output
        self._ready: list[RequestOutput] = []  # outputs produced outside a step (add_prefilled)
        self._ids = itertools.count()

    # --- requests -----------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerUnavailableError(
                    f"model {self.config.model!r} has no tokenizer; pass token ids instead of text"
                )
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Seq) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidPromptError(
                    f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
                )
        else:
            raise InvalidPromptError(
                f"a prompt is a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidPromptError("the prompt is empty; give at least one token")
        return ids

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and enqueue; raises a specific PDServeError for bad input and changes nothing then."""
        seq = self._new_sequence(prompt, params, request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        first_token: int,
        params: SamplingParams,
        block_ids: list[int],
    ) -> None:
        """Decode role: continue a request prefilled elsewhere. Its prompt's KV is in `block_ids`
        (blocks of this engine's allocator, e.g. from KVReceiver.take), now owned by the request;
        `first_token` is the token the prefill side sampled. Greedy output is identical to the
        colocated engine's; a seeded request continues from a fresh generator of its seed."""
        seq = self._new_sequence(list(prompt_token_ids), params, request_id)
        needed = blocks_needed(seq.num_prompt_tokens, self.scheduler.block_size)
        problem = None
        if len(block_ids) != needed:
            problem = f"{seq.num_prompt_tokens} prompt tokens need {needed} KV blocks, got {len(block_ids)}"
        elif not 0 <= first_token < self.vocab_size:
            problem = f"first token {first_token} is outside the vocabulary [0, {self.vocab_size})"
        if problem is not None:
            self._forget(seq)
            raise InvalidPromptError(f"request {request_id!r}: {problem}")
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.scheduler.adopt(seq)
        self._append_token(seq, first_token, time.monotonic())
        if seq.is_finished:  # its first token was also its last
            self._ready.append(self._pop_output(seq))

    def _new_sequence(
        self, prompt: Prompt, params: SamplingParams | None, request_id: str | None
    ) -> Sequence:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidPromptError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise TokenizerUnavailableError(
                f"model {self.config.model!r} has no tokenizer, so stop strings cannot be matched; "
                "use stop_token_ids instead"
            )
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt plus at least one generated token); shorten the prompt"
            )
        if len(ids) + 1 > self.scheduler.capacity_tokens:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the KV cache holds {self.scheduler.capacity_tokens}; "
                "raise kv_cache_memory or shorten the prompt"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise InvalidPromptError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, len(ids), params, time.monotonic(), make_generator(params.seed))
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
            )
        self._texts[request_id] = ""
        return seq

    def _forget(self, seq: Sequence) -> None:
        """Drop every per-request record of `seq` (its blocks are already freed or handed off)."""
        del self._seqs[seq.request_id], self._texts[seq.request_id]
        for records in (self._detok, self._errors, self._handed_off):
            records.pop(seq.request_id, None)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return self._pop_output(seq)

    def has_unfinished_requests(self) -> bool:
        """True while a step has something to do or an output to return."""
        return self.scheduler.has_unfinished() or bool(self._ready)

    def close(self) -> None:
        """Stop the engine's other ranks (a no-op for a single-process engine); the engine cannot
        step afterwards."""
        if self.ranks is not None:
            self.ranks.close()

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.allocator.num_free_blocks

    # --- the loop -----------------------------------------------------------------------------

    def step(self, layer_hook: LayerHook | None = None) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced a token or finished."""
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for chunk in plan.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now  # its queueing ends as its first step starts
        for seq in plan.out_of_memory:
            self._finish(seq, "length")
        on_layer_stored, hooked = None, ()
        if layer_hook is not None:
            done = [(c.seq.request_id, list(c.seq.block_table)) for c in plan.chunks if c.samples]
            done = done if self.role == "prefill" else []
            on_layer_stored = (lambda layer: layer_hook(done, layer)) if done else None
            hooked = tuple((request_id, tuple(blocks)) for request_id, blocks in done)
        sampled = self.runner.execute(plan.chunks, on_layer_stored, hooked) if plan.chunks else None
        updated = self._postprocess(plan.chunks, sampled)
        ready, self._ready = self._ready, []
        return ready + [
            self._pop_output(s) if s.is_finished else self._output(s) for s in (*plan.out_of_memory, *updated)
        ]

    def _postprocess(self, chunks: list[ScheduledChunk], sampled: SamplerOutput | None) -> list[Sequence]:
        now = time.monotonic()
        updated: list[Sequence] = []
        i = 0
        for chunk in chunks:
            seq = chunk.seq
            samples = chunk.samples
            seq.num_computed_tokens += chunk.num_tokens
            if not samples:
                continue
            token = sampled.token_ids[i]
            seq.output_logprobs.append(sampled.logprobs[i])
            seq.output_top_logprobs.append(sampled.top_logprobs[i])
            i += 1
            try:
                self._append_token(seq, token, now)
                if self.role == "prefill" and not seq.is_finished:
                    self._finish(seq, "prefilled")  # decode continues elsewhere
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail(seq, exc)
            updated.append(seq)
        return updated

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """Finish `seq` with finish_reason "error" (blocks freed), keeping the cause for its output."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "error")
            seq.finished_time = time.monotonic()
        self._errors[seq.request_id] = (
            exc if isinstance(exc, PDServeError) else PDServeError(f"request failed: {exc!r}")
        )

    def _append_token(self, seq: Sequence, token: int, now: float) -> None:
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        detok = self._detok.get(seq.request_id)
        stopped_by_string = False
        if detok is not None:
            detok.add_token(token)
            text = detok.text
            if p.stop and seq.num_output_tokens >= p.min_tokens:
                cut = _find_stop(text, p.stop, len(self._texts[seq.request_id]))
                if cut is not None:
                    text, stopped_by_string = text[:cut], True
            self._texts[seq.request_id] = text
        n = seq.num_output_tokens
        can_stop = n >= p.min_tokens
        if stopped_by_string:
            self._finish(seq, "stop")
        elif can_stop and not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop")
        elif can_stop and token in p.stop_token_ids:
            self._finish(seq, "stop")
        elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self.role == "prefill" and seq.num_output_tokens == 1:  # its KV goes to the caller
            self._handed_off[seq.request_id] = self.scheduler.hand_off(seq)
            seq.finish_reason = reason
        else:
            self.scheduler.finish(seq, reason)
        seq.finished_time = time.monotonic()
        detok = self._detok.get(seq.request_id)
        if detok is not None and reason in ("length", "abort"):
            self._texts[seq.request_id] = self._texts[seq.request_id] + detok.flush()

    def _output(self, seq: Sequence) -> RequestOutput:
        want_logprobs = seq.params.logprobs is not None
        text = self._texts[seq.request_id]
        if seq.params.stop and not seq.is_finished:
            # Hold back a tail that could still become the start of a stop string, so streamed text
            # is never retracted: a stop found later starts at or after what was shown.
            text = text[: max(0, len(text) - (max(map(len, seq.params.stop)) - 1))]
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids,
            text=text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if want_logprobs else None,
            top_logprobs=list(seq.output_top_logprobs) if want_logprobs and seq.params.logprobs else None,
            timeline=RequestTimeline(
                seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, seq.finished_time
            ),
            error=self._errors.get(seq.request_id),
            kv_blocks=self._handed_off.get(seq.request_id),
        )

    def _pop_output(self, seq: Sequence) -> RequestOutput:
        out = self._output(seq)
        self._forget(seq)
        return out


def _find_stop(text: str, stops: tuple[str, ...], checked: int) -> int | None:
    """Index where the earliest stop string starts, searching only text not searched before."""
    hits = []
    for s in stops:
        i = text.find(s, max(0, checked - len(s) + 1))
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None
