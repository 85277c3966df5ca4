"""Many replies generated together by one model, behind the Backend API.

`BatchedBackend.stream()` has the same contract as the other backends (text pieces as they are decoded,
cancellable, counts at the end) but hands a request to one engine shared by the whole process, which
runs every request in flight through the same forward passes; new requests join between steps. The
worker runs several RQ worker loops in threads over it (`shallow worker --slots N`): each job is still
one RQ job, started, finished, failed or retried on its own, with its own stream.

Two engines: `slots` (the default, `worker/engine.py`: a static KV cache with one row per slot, the
decoding step replayed as a CUDA graph, sampling per request) and `paged` (transformers'
`ContinuousBatchingManager`, `SHALLOW_BATCH_ENGINE=paged`). On CUDA the base is loaded in 4-bit
(NF4, the adapter kept beside it) when SHALLOW_LOAD_IN_4BIT is on, the design card's mode; otherwise
the adapter is merged into the weights at load (bf16 on CUDA, fp32 on the CPU), no adapter arithmetic
per token.
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
from worker.backends import Backend, Generation, _context, _pick_device, _tokenizer_source, nf4_config
from worker.engine import MARGIN, EngineStopped, Request, SlotEngine, kv_shape, register_attention

logger = logging.getLogger(__name__)

POLL = 0.05  # seconds a stream waits for its next tokens before it checks for a cancel
BATCHED_CONTEXT = 4096  # the default context of the batched backend: every slot holds a KV cache this long


class PagedEngine:
    """transformers' ContinuousBatchingManager (paged KV cache); one thread routes its results to the requests.

    Its sampling is set once for the engine from the worker's settings: a request's own temperature,
    top-p and repetition penalty are not applied (the slot engine applies them).
    """

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
        self.requests: dict[str, tuple[Request, list[int]]] = {}
        self.lock = threading.Lock()
        self.counter = 0
        self.router = threading.Thread(target=self._route, name="batch-router", daemon=True)
        self.router.start()

    def _route(self) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        while True:
            result = self.manager.get_result(timeout=0.5)
            if result is None:
                if not self.manager.is_running():
                    with self.lock:
                        waiting, self.requests = list(self.requests.values()), {}
                    for request, _ in waiting:
                        request.out.put(EngineStopped("the batching engine stopped"))
                    if not waiting:
                        time.sleep(0.5)
                continue
            with self.lock:
                entry = self.requests.get(result.request_id)
            if entry is None:  # a cancelled request's late results have nowhere to go
                continue
            request, seen = entry
            if result.error:
                request.out.put(RuntimeError(f"generation failed: {result.error}"))
                self._forget(result.request_id)
                continue
            new = list(result.generated_tokens[len(seen):])
            seen.extend(new)
            request.generated = len(seen)
            if new:
                request.out.put(new)
            if result.is_finished() or result.status == RequestStatus.FINISHED:
                request.out.put(None)
                self._forget(result.request_id)

    def submit(self, request: Request) -> None:
        with self.lock:
            self.counter += 1
            request_id = f"r{self.counter}"
            request.engine_id = request_id
            self.requests[request_id] = (request, [])
        kwargs: dict[str, object] = {} if request.eos else {"eos_token_id": -1}
        added = self.manager.add_request(request.ids, request_id=request_id, max_new_tokens=request.max_new_tokens,
                                         streaming=True, **kwargs)
        if added is None:
            self._forget(request_id)
            raise EngineStopped("the batching engine is not accepting requests")

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self.manager.cancel_request(request.engine_id)
        self._forget(request.engine_id)

    def _forget(self, request_id: str) -> None:
        with self.lock:
            self.requests.pop(request_id, None)

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)


class BatchedBackend(Backend):
    name = "batched"

    def __init__(self, *args, engine: SlotEngine | PagedEngine, eos: frozenset[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.eos = eos

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
        attention = "sdpa" if settings.batch_engine == "paged" else register_attention()
        kwargs: dict[str, object] = {"dtype": dtype, "device_map": {"": device}, "attn_implementation": attention}
        four_bit = settings.load_in_4bit and device.startswith("cuda")
        if four_bit:  # the design card's mode: NF4 base, the adapter kept beside it
            kwargs["quantization_config"] = nf4_config()
        try:
            tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(base, adapter))
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        except OSError as exc:
            raise ModelNotFound(f"Cannot load the base model {base!r}: {exc}") from None
        if adapter:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, adapter)
            except (OSError, ValueError) as exc:
                raise ModelNotFound(f"Cannot load the adapter {adapter!r}: {exc}") from None
            if not four_bit:
                model = model.merge_and_unload()  # one set of weights, no adapter arithmetic per token
        model.eval()
        slots = max(1, settings.slots)
        context = settings.context_tokens or min(_context(settings, model.config), BATCHED_CONTEXT)
        eos = _eos_ids(model, tokenizer)
        if settings.batch_engine == "paged":
            try:
                engine: SlotEngine | PagedEngine = PagedEngine(
                    model, tokenizer, settings.generation, settings.generation.max_new_tokens, slots,
                    settings.compile_level if device.startswith("cuda") else 0, settings.cuda_graphs)
            except (ValueError, RuntimeError, NotImplementedError) as exc:
                raise ConfigError(f"continuous batching is not available for {base}: {exc}") from None
            how = "paged engine"
        else:
            length = context + MARGIN
            layers, heads, head_dim = kv_shape(model.config)
            per_row = 2 * layers * heads * head_dim * model.dtype.itemsize * length
            if device.startswith("cuda"):
                free, _ = torch.cuda.mem_get_info(torch.device(device))
                if per_row * slots > 0.8 * free:
                    raise ConfigError(
                        f"{slots} slots of {length} tokens need {per_row * slots / 2**30:.1f} GiB of KV cache and "
                        f"{free / 2**30:.1f} GiB are free: lower SHALLOW_SLOTS or SHALLOW_CONTEXT_TOKENS")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            graphs = settings.cuda_graphs is not False
            compiled = settings.compile_level > 0 and device.startswith("cuda")
            from worker.fuse import fuse_projections

            fused = fuse_projections(model)  # merged Llama weights: q/k/v and gate/up as one product each
            int4, prefill_model = 0, None
            if settings.weights == "int4":
                import copy

                from worker.quantize import quantize_int4

                # prompts through a bf16 copy: the int4 kernel is fast for a step's few rows, slow for a prompt's many
                prefill_model = copy.deepcopy(model)
                int4 = quantize_int4(model)  # after fusing: the fused products are quantized whole
            # compiled: the forward pass, and the sampling after it as a second graph ("split": 1.20 ms a step at one row
            # on an H200 in session 17, against 1.30 with the forward pass alone in session 16, another machine)
            engine = SlotEngine(model, slots, length, cuda_graphs=graphs, pad_id=int(pad or 0),
                                compile="split" if compiled else False, prefill_model=prefill_model)
            how = (f"slot engine, {engine.cache_bytes / 2**30:.2f} GiB KV cache" + (", CUDA graphs" if engine.use_graphs else "")
                   + (", q/k/v and gate/up fused" if fused else "")
                   + (f", int4 weights ({int4} linear layers; prompts through the bf16 ones)" if int4 else "")
                   + (", torch.compile" if compiled else ""))
        desc = (f"{base}" + (f" + adapter {adapter}" + ("" if four_bit else " (merged)") if adapter else "")
                + f" on {device}, {slots} slot(s), {'NF4 base' if four_bit else dtype}, {how}")
        return cls(model, tokenizer, device, context, desc, engine=engine, eos=eos)

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
        """Add one request to the shared batch; the Generation yields its text as its tokens arrive."""
        ids = self.encode(messages, continue_final=continue_final)
        generation = Generation(pieces=iter(()), prompt_tokens=len(ids))
        engine = self.engine
        request = Request(ids=ids, max_new_tokens=max_new_tokens, eos=frozenset() if ignore_eos else self.eos,
                          temperature=gen.temperature, top_p=gen.top_p, repetition_penalty=gen.repetition_penalty)
        decode = _incremental_decoder(self.tokenizer)

        def pieces() -> Iterator[str]:
            engine.submit(request)
            count = 0
            text = ""
            finished = False
            try:
                while True:
                    try:
                        item = request.out.get(timeout=POLL)
                    except queue.Empty:
                        item = False
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        finished = True
                        break
                    if item:  # the tokens of one engine step or more: one piece of text for all of them
                        count += len(item)
                        piece = decode(item)
                        if piece:
                            text += piece
                            yield piece
                        if stop_at_newline and text.strip() and "\n" in text.lstrip():
                            generation.finish_reason = "stop"
                            break
                    if should_stop():
                        generation.finish_reason = "cancelled"
                        break
            finally:
                if not finished:
                    engine.cancel(request)
            generation.completion_tokens = request.generated if finished else count
            if finished and request.generated >= request.max_new_tokens:
                generation.finish_reason = "length"

        generation.pieces = pieces()
        return generation


def _incremental_decoder(tokenizer) -> Callable[[list[int]], str]:
    """A function from a reply's next tokens to its next text: tokenizers' DecodeStream, O(1) a token.

    (transformers' TextIteratorStreamer decodes the whole reply so far at every step: at hundreds of
    replies at once, that decoding took the interpreter lock that the engine needs.) Special tokens are
    skipped, and a token that ends inside a character waits for the rest of it, as the streamer does.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)

        def step(tokens: list[int]) -> str:
            return "".join(p for p in (stream.step(backend, t) for t in tokens) if p)

        return step
    seen: list[int] = []  # a tokenizer without the fast backend: decode it all and send what is new
    sent = [0]

    def whole(tokens: list[int]) -> str:
        seen.extend(tokens)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character cut in two: wait for its other bytes
            return ""
        new, sent[0] = text[sent[0]:], len(text)
        return new

    return whole


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """Every end-of-turn token the model may write (Llama 3 has several), as `generate` stops on them."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(int(i) for i in ids if i is not None)
