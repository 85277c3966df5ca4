"""Many replies generated together by one model: transformers' continuous batching behind the Backend API.

`BatchedBackend.stream()` has the same contract as the other backends (text pieces as they are decoded,
cancellable, counts at the end) but adds a request to one shared `ContinuousBatchingManager`, which
schedules every request in flight into the same forward passes (paged KV cache, new requests joining
between steps). The worker runs several RQ worker loops in threads over it (`shallow worker --slots N`):
each job is still one RQ job, started, finished, failed or retried on its own, with its own stream.

LoRA adapters are merged into the base weights at load (no adapter arithmetic per token), in bf16 on
CUDA and fp32 on the CPU. The 4-bit + LoRA mode of the design card stays available as the
`transformers` and `unsloth` backends.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from shared.errors import ConfigError, ModelNotFound
from shared.models import resolve_model
from shared.prompts import Message
from shared.settings import GenerationSettings, Settings
from worker.backends import Backend, Generation, _context, _pick_device, _tokenizer_source

logger = logging.getLogger(__name__)

POLL = 0.05  # seconds a stream waits for its next tokens before it checks for a cancel


class BatchEngine:
    """One ContinuousBatchingManager, its results routed to each request's own queue by one thread."""

    def __init__(self, model, tokenizer, gen: GenerationSettings, max_new_tokens: int, slots: int, compile_level: int,
                 cuda_graphs: bool | None = None) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        eos = tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=gen.temperature > 0,
            temperature=gen.temperature if gen.temperature > 0 else None,
            top_p=gen.top_p if gen.temperature > 0 else None,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
        cb_kwargs: dict[str, object] = {"max_requests_per_batch": max(1, slots), "default_compile_level": compile_level}
        if cuda_graphs is not None and model.device.type == "cuda":
            cb_kwargs["use_cuda_graph"] = cuda_graphs
        if model.device.type != "cuda":
            cb_kwargs.update(num_blocks=max(16, slots * 4), max_batch_tokens=max(256, slots * 16), block_size=64)
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs)
        )
        self.manager.start()
        self.queues: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        self.counter = 0
        self.router = threading.Thread(target=self._route, name="batch-router", daemon=True)
        self.router.start()

    def _route(self) -> None:
        while True:
            result = self.manager.get_result(timeout=0.5)
            if result is None:
                if not self.manager.is_running():
                    with self.lock:
                        waiting = list(self.queues.values())
                    for q in waiting:
                        q.put(RuntimeError("the batching engine stopped"))
                    if not waiting:
                        time.sleep(0.5)
                continue
            with self.lock:
                q = self.queues.get(result.request_id)
            if q is not None:  # a cancelled request's late results have nowhere to go
                q.put(result)

    def submit(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> tuple[str, queue.Queue]:
        with self.lock:
            self.counter += 1
            request_id = f"r{self.counter}"
            q: queue.Queue = queue.Queue()
            self.queues[request_id] = q
        kwargs: dict[str, object] = {"eos_token_id": -1} if ignore_eos else {}
        added = self.manager.add_request(ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True, **kwargs)
        if added is None:
            self.forget(request_id)
            raise RuntimeError("the batching engine is not accepting requests")
        return request_id, q

    def cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)
        self.forget(request_id)

    def forget(self, request_id: str) -> None:
        with self.lock:
            self.queues.pop(request_id, None)

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)


class BatchedBackend(Backend):
    name = "batched"

    def __init__(self, *args, engine: BatchEngine, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine

    def close(self) -> None:
        self.engine.stop()

    @classmethod
    def load(cls, settings: Settings) -> BatchedBackend:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = resolve_model(settings.base_model, settings.cache_dir, "base model")
        adapter = resolve_model(settings.adapter, settings.cache_dir, "adapter") if settings.adapter else None
        device = _pick_device(settings.device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(base, adapter))
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": device})
        except OSError as exc:
            raise ModelNotFound(f"Cannot load the base model {base!r}: {exc}") from None
        if adapter:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # one set of weights
            except (OSError, ValueError) as exc:
                raise ModelNotFound(f"Cannot load the adapter {adapter!r}: {exc}") from None
        model.eval()
        slots = max(1, settings.slots)
        try:
            engine = BatchEngine(model, tokenizer, settings.generation, settings.generation.max_new_tokens, slots,
                                 settings.compile_level if device.startswith("cuda") else 0, settings.cuda_graphs)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise ConfigError(f"continuous batching is not available for {base}: {exc}") from None
        desc = f"{base}" + (f" + adapter {adapter} (merged)" if adapter else "") + f" on {device}, {slots} slot(s), {dtype}"
        return cls(model, tokenizer, device, _context(settings, model.config), desc, engine=engine)

    def stream(
        self,
        messages: list[Message],
        gen: GenerationSettings,
        *,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        continue_final: bool = False,
        stop_at_newline: bool = False,
        ignore_eos: bool = False,
    ) -> Generation:
        """Add one request to the shared batch; the Generation yields its text as its tokens arrive.

        Sampling (temperature, top_p) is the engine's, set from the worker's settings at load.
        """
        import torch
        from transformers import TextIteratorStreamer

        ids = self.encode(messages, continue_final=continue_final)
        generation = Generation(pieces=iter(()), prompt_tokens=len(ids))
        engine = self.engine
        tokenizer = self.tokenizer

        def pieces() -> Iterator[str]:
            from transformers.generation.continuous_batching.requests import RequestStatus

            streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
            request_id, results = engine.submit(ids, max_new_tokens, ignore_eos)
            seen = 0
            text = ""
            finished = False
            try:
                while True:
                    try:
                        result = results.get(timeout=POLL)
                    except queue.Empty:
                        result = None
                    if isinstance(result, BaseException):
                        raise result
                    if result is not None:
                        if result.error:
                            raise RuntimeError(f"generation failed: {result.error}")
                        new = result.generated_tokens[seen:]
                        seen = len(result.generated_tokens)
                        if new:
                            streamer.put(torch.tensor(new))
                        finished = result.is_finished() or result.status == RequestStatus.FINISHED
                        if finished:
                            streamer.end()
                        while not streamer.text_queue.empty():
                            piece = streamer.text_queue.get_nowait()
                            if piece is streamer.stop_signal:
                                continue
                            if piece:
                                text += piece
                                yield piece
                        if finished:
                            break
                        if stop_at_newline and text.strip() and "\n" in text.lstrip():
                            generation.finish_reason = "stop"
                            break
                    if should_stop():
                        generation.finish_reason = "cancelled"
                        break
            finally:
                if not finished:
                    engine.cancel(request_id)
                else:
                    engine.forget(request_id)
            generation.completion_tokens = seen
            if generation.finish_reason == "stop" and finished and seen >= max_new_tokens:
                generation.finish_reason = "length"

        generation.pieces = pieces()
        return generation
