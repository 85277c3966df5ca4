"""Generation backends behind one small interface: count a prompt's tokens, stream a reply.

`transformers` runs anywhere (CPU, or CUDA with a 4-bit base through bitsandbytes, adapter through
peft); `unsloth` runs on CUDA (FastLanguageModel in 4-bit, `for_inference`); `batched` many replies at
once (worker/batching.py); `llamacpp` a GGUF file on the CPU (worker/llamacpp.py). `auto` picks unsloth
when CUDA and unsloth are both there, llamacpp on a machine without CUDA when SHALLOW_GGUF is set, else
transformers. unsloth and bitsandbytes are imported only on that path.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, ModelNotFound
from shared.models import resolve_model
from shared.prompts import Message
from shared.settings import GenerationSettings, Settings

logger = logging.getLogger(__name__)

MAX_CONTEXT = 8192  # the cap on the model's own context: KV memory, and far beyond any chat here
TEXT_COUNTS = 16384  # messages whose own token counts a process keeps (a long history's, read again every turn)
RECENT_PROMPTS = 4  # prompts a thread keeps encoded for the reply that follows the counting (`Backend.encode`)


@dataclass
class Generation:
    """One streamed generation: iterate for text pieces; the counts are set when it ends."""

    pieces: Iterator[str]
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | cancelled

    def __iter__(self) -> Iterator[str]:
        return iter(self.pieces)


class Backend:
    """What the worker needs from a model. Subclasses load it; the streaming is shared."""

    name = "base"

    def __init__(self, model, tokenizer, device: str, context_tokens: int, description: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"The tokenizer of {description} has no chat template; shallow needs a chat (instruct) model, "
                "or an adapter saved with its chat-templated tokenizer."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_tokens = context_tokens
        self.description = description
        self.static_cache = False
        self._last_prompt = threading.local()  # per thread: the last prompts encoded, and their ids
        # a message's own tokens (no template): the same history is counted turn after turn (`fit_messages`)
        self.text_tokens = functools.lru_cache(maxsize=TEXT_COUNTS)(self._text_tokens)

    def close(self) -> None:
        """Release what the backend runs besides the model (the batched backend's engine thread)."""

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, messages: list[Message], *, continue_final: bool = False) -> list[int]:
        """The prompt's token ids as the model sees them (chat template, generation prompt).

        A turn counts its prompt while fitting the history (`fit_messages`), then streams that same prompt:
        the thread's last prompt and its ids are kept, so the second encode is a lookup (the chat template
        and the tokenizer cost ~0.4-0.5 ms of CPU a prompt, on the interpreter the job's other work shares).
        Used once: a later turn renders its prompt afresh (a template may write today's date into it).
        """
        key = (continue_final, tuple(tuple(sorted(m.items())) for m in messages))
        recent = getattr(self._last_prompt, "value", None) or {}
        if key in recent:
            self._last_prompt.value = None
            return recent[key]
        out = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            tokenize=True,
            return_dict=True,
        )
        ids = list(out["input_ids"])
        # the last few: fitting a long history counts a prompt or two more after the one it keeps
        kept = list(recent.items())[-(RECENT_PROMPTS - 1):] if RECENT_PROMPTS > 1 else []
        self._last_prompt.value = {**dict(kept), key: list(ids)}
        return ids

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def _text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- generation ------------------------------------------------------------------------------

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
        """Start generating in a thread; the returned Generation yields text as it is decoded."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids = self.encode(messages, continue_final=continue_final)
        prompt_len = len(ids)
        input_ids = torch.tensor([ids], device=self.model.device)
        tokenizer = self.tokenizer
        cancelled = threading.Event()
        abandoned = threading.Event()  # the consumer went away (timeout, error): stop at the next step

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001 - transformers' signature
                if abandoned.is_set() or should_stop():
                    cancelled.set()
                    return True
                if stop_at_newline:
                    text = tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
                    return bool(text.strip()) and "\n" in text.lstrip()
                return False

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([Stop()]),
            repetition_penalty=gen.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if gen.temperature > 0:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        if self.static_cache:
            kwargs["cache_implementation"] = "static"  # on CUDA, transformers compiles the decoding step for it

        result: dict[str, object] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    out = self.model.generate(**kwargs)
                result["new_tokens"] = int(out.shape[1]) - prompt_len
            except BaseException as exc:  # handed to the consumer, which raises it in the job
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        generation = Generation(pieces=iter(()), prompt_tokens=prompt_len)

        def pieces() -> Iterator[str]:
            thread.start()
            try:
                for text in streamer:
                    if text:
                        yield text
            finally:
                if thread.is_alive():
                    abandoned.set()
                thread.join()
            if "error" in result:
                raise result["error"]  # type: ignore[misc]
            n = int(result.get("new_tokens", 0))
            generation.completion_tokens = n
            if cancelled.is_set():
                generation.finish_reason = "cancelled"
            elif n >= max_new_tokens:
                generation.finish_reason = "length"

        generation.pieces = pieces()
        return generation


def nf4_config():
    """The design card's 4-bit base: NF4 with double quantisation, bf16 compute (bitsandbytes, CUDA only)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def _pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"SHALLOW_DEVICE={requested} but CUDA is not available on this machine")
    return requested


def _context(settings: Settings, config) -> int:
    own = int(getattr(config, "max_position_embeddings", 0) or MAX_CONTEXT)
    return settings.context_tokens or min(own, MAX_CONTEXT)


def _tokenizer_source(base: str, adapter: str | None) -> str:
    """An adapter folder saved with its tokenizer (the lab's was) carries the chat template it was trained on."""
    if adapter and Path(adapter).is_dir() and (Path(adapter) / "tokenizer_config.json").exists():
        return adapter
    return base


class TransformersBackend(Backend):
    name = "transformers"

    @classmethod
    def load(cls, settings: Settings) -> TransformersBackend:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = resolve_model(settings.base_model, settings.cache_dir, "base model")
        adapter = resolve_model(settings.adapter, settings.cache_dir, "adapter") if settings.adapter else None
        device = _pick_device(settings.device)
        kwargs: dict[str, object] = {}
        if device.startswith("cuda"):
            kwargs["device_map"] = {"": device}
            if settings.load_in_4bit:
                kwargs["quantization_config"] = nf4_config()
            kwargs["dtype"] = torch.bfloat16
        else:
            kwargs["dtype"] = torch.float32  # bf16 matmuls are slower than fp32 on most CPUs
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
        if device == "cpu":
            model.to("cpu")
        model.eval()
        if settings.static_cache and device.startswith("cuda") and not settings.load_in_4bit:
            import torch._inductor.config as inductor_config

            # generate() runs in a helper thread here; CUDA graph trees keep their state per thread and
            # failed there ("assert torch._C._is_key_in_tls") on torch 2.11: use plain CUDA graphs
            inductor_config.triton.cudagraph_trees = False
            if adapter:
                model = model.merge_and_unload()  # one set of weights for the compiled step
            backend = cls(model, tokenizer, device, _context(settings, model.config), "")
            backend.static_cache = True
        desc = f"{base}" + (f" + adapter {adapter}" if adapter else "") + f" on {device}"
        if settings.static_cache and device.startswith("cuda") and not settings.load_in_4bit:
            backend.description = desc + ", bf16, static cache + torch.compile"
            return backend
        return cls(model, tokenizer, device, _context(settings, model.config), desc)


class UnslothBackend(Backend):
    name = "unsloth"

    @classmethod
    def load(cls, settings: Settings) -> UnslothBackend:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("SHALLOW_BACKEND=unsloth needs CUDA; use transformers on this machine")
        try:
            from unsloth import FastLanguageModel  # imported only here: it needs CUDA
        except ImportError as exc:
            raise ConfigError(f"SHALLOW_BACKEND=unsloth but unsloth cannot be imported ({exc}); pip install '.[gpu]'") from None
        base = resolve_model(settings.base_model, settings.cache_dir, "base model")
        adapter = resolve_model(settings.adapter, settings.cache_dir, "adapter") if settings.adapter else None
        max_seq = settings.context_tokens or MAX_CONTEXT
        if adapter:
            _check_adapter_base(adapter, base)
        try:
            # Given an adapter, unsloth loads the base that the adapter names and attaches it (the path
            # seen working on the GPU machine); the adapter's tokenizer and chat template come with it.
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=adapter or base, max_seq_length=max_seq, load_in_4bit=settings.load_in_4bit, dtype=None
            )
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"Cannot load {'the adapter ' + repr(adapter) if adapter else 'the base model ' + repr(base)}: {exc}") from None
        FastLanguageModel.for_inference(model)
        desc = f"{base}" + (f" + adapter {adapter}" if adapter else "") + " on cuda (unsloth)"
        return cls(model, tokenizer, "cuda", min(_context(settings, model.config), max_seq), desc)


def _check_adapter_base(adapter: str, base: str) -> None:
    """unsloth loads the base an adapter names; say so when that is not SHALLOW_BASE_MODEL."""
    import json

    config = Path(adapter) / "adapter_config.json"
    if config.exists():
        named = json.loads(config.read_text()).get("base_model_name_or_path")
        if named and named.rstrip("/") != base.rstrip("/"):
            logger.warning("the adapter %s was trained on %s, not SHALLOW_BASE_MODEL=%s; unsloth loads %s", adapter, named, base, named)


def unsloth_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def pick_backend(settings: Settings) -> str:
    """SHALLOW_BACKEND, or for `auto`: unsloth on CUDA, llama.cpp without CUDA when a GGUF is configured, else transformers."""
    if settings.backend != "auto":
        return settings.backend
    if unsloth_available():
        return "unsloth"
    if settings.gguf:
        import torch

        from worker.llamacpp import llama_cpp_available

        if not torch.cuda.is_available():
            if llama_cpp_available():
                return "llamacpp"
            logger.warning("SHALLOW_GGUF is set but llama-cpp-python is not installed (./scripts/setup --with-llamacpp): "
                           "serving SHALLOW_BASE_MODEL with transformers")
    return "transformers"


def load_backend(settings: Settings) -> Backend:
    """The backend that SHALLOW_BACKEND names, loaded once; `auto` takes unsloth when it can."""
    choice = pick_backend(settings)
    if settings.weights == "int4":
        from worker.quantize import refuse_int4

        refuse_int4(settings, choice, _pick_device(settings.device))
    if choice == "llamacpp":
        from worker.llamacpp import LlamaCppBackend

        backend: Backend = LlamaCppBackend.load(settings)
    elif choice == "batched":
        from worker.batching import BatchedBackend

        backend = BatchedBackend.load(settings)
    else:
        backend = (UnslothBackend if choice == "unsloth" else TransformersBackend).load(settings)
    logger.info("loaded %s backend: %s (context %d tokens)", backend.name, backend.description, backend.context_tokens)
    return backend
