"""The offline API: `LLM(model=...).generate(prompts, params)` and `.chat(messages, params)`."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from engine.engine_config import EngineConfig
from engine.errors import PDServeError, TokenizerUnavailableError
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Batch generation in one process.

    `generate` takes one prompt or a list. With one prompt a bad request raises its error; with a
    list every bad request fails alone: its output has finish_reason "error" and `.error` set,
    and the others are generated as usual.
    """

    def __init__(self, model: str = "smollm2-135m", **engine_args: Any) -> None:
        self._attach(LLMEngine(EngineConfig(model=model, **engine_args)))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any (also on leaving a `with` block)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, Seq) and bool(prompts) and all(isinstance(t, int) for t in prompts)
        )
        batch: list[Prompt] = [prompts] if single else list(prompts)
        return self._run(batch, params, single, use_tqdm, self.engine.add_request)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations; a
        conversation the template rejects fails alone, like any bad prompt in a batch."""
        if self.tokenizer is None:
            raise TokenizerUnavailableError(f"model {self.engine.config.model!r} has no tokenizer for chat")
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)

        def submit(conversation: list[Message], p: SamplingParams) -> str:
            return self.engine.add_request(self.chat_prompt_ids(conversation), p)

        return self._run(conversations, params, single, use_tqdm, submit)

    def chat_prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids of `messages` rendered with the chat template, ready for the assistant's turn."""
        if self.tokenizer is None:
            raise TokenizerUnavailableError(f"model {self.engine.config.model!r} has no tokenizer for chat")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run(
        self,
        items: list[Any],
        params: SamplingParams | Seq[SamplingParams] | None,
        single: bool,
        use_tqdm: bool,
        submit: Callable[[Any, SamplingParams], str],
    ) -> list[RequestOutput]:
        """Submit every item, step the engine until all are done, return outputs in input order.
        If this is interrupted (Ctrl-C, an error), the requests it submitted are aborted."""
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(items)
        else:
            params_list = list(params)
            if len(params_list) != len(items):
                raise ValueError(f"{len(items)} prompts but {len(params_list)} SamplingParams")
        results: dict[int, RequestOutput] = {}
        order: dict[str, int] = {}
        try:
            for i, (item, p) in enumerate(zip(items, params_list, strict=True)):
                try:
                    order[submit(item, p)] = i
                except PDServeError as exc:
                    if single:
                        raise
                    results[i] = RequestOutput(f"failed-{i}", [], [], "", True, "error", error=exc)
            with tqdm(
                total=len(order), desc="generating", unit="req", disable=not use_tqdm, delay=1.0, leave=False
            ) as bar:
                while order and self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished and out.request_id in order:
                            results[order.pop(out.request_id)] = out
                            bar.update(1)
        finally:
            for request_id in order:
                self.engine.abort_request(request_id)
        if single and results[0].error is not None:
            raise results[0].error
        return [results[i] for i in range(len(items))]
