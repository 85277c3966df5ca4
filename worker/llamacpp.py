"""The `llamacpp` backend: a GGUF model (`shallow export gguf`) served by llama.cpp on the CPU.

Same contract as the other backends. Prompts are built with the model's own chat template by the
tokenizer that transformers reads from the same GGUF file (so `continue_final` and token counts behave as
everywhere else); llama.cpp (through llama-cpp-python) evaluates them and samples; the text is decoded
incrementally by that tokenizer. One reply at a time per process: llama.cpp's context is one sequence.
A new turn of the same conversation reuses the cached prefix (llama-cpp-python's prefix match).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from shared.errors import ConfigError, ModelNotFound
from shared.prompts import Message
from shared.settings import GenerationSettings, Settings
from worker.backends import Backend, Generation

logger = logging.getLogger(__name__)

LLAMACPP_CONTEXT = 4096  # the default context: llama.cpp allocates its KV cache for all of it at load
TOP_K = 50  # as transformers' generate samples by default, so both backends draw from the same rule


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def tokenizer_dir(gguf: Path) -> Path:
    """Where `shallow export gguf` saves the tokenizer (and its chat template) beside the GGUF file."""
    return gguf.with_name(gguf.stem + ".tokenizer")


def end_of_generation_tokens(llm) -> frozenset[int]:
    """Every token llama.cpp itself ends a reply on (end of turn, end of text, ...), read from the GGUF's vocabulary."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return frozenset(t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t))


def compute_threads() -> int:
    """llama.cpp's threads: OMP_NUM_THREADS when set (the usual knob for CPU compute threads), else every core.

    llama.cpp's threads spin while they wait for each other: on a box where something else computes too,
    fewer threads than cores is much faster than a fight over them.
    """
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        wanted = 0
    return wanted if wanted > 0 else (os.cpu_count() or 1)


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, llm, tokenizer, context_tokens: int, description: str, eos: frozenset[int]) -> None:
        super().__init__(llm, tokenizer, "cpu", context_tokens, description)
        self.eos = eos
        self.lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings) -> LlamaCppBackend:
        if not settings.gguf:
            raise ConfigError("SHALLOW_BACKEND=llamacpp needs SHALLOW_GGUF, a .gguf file (shallow export gguf writes one)")
        path = Path(settings.gguf).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"SHALLOW_GGUF={settings.gguf}: no such file (shallow export gguf writes one)")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ConfigError("SHALLOW_BACKEND=llamacpp but llama-cpp-python is not installed: run "
                              "./scripts/setup --with-llamacpp (it builds it for this CPU's safe instruction set)") from None
        from transformers import AutoTokenizer

        beside = tokenizer_dir(path)
        try:  # the tokenizer saved beside the GGUF by `shallow export gguf` (a second); else read from the GGUF (slow)
            if (beside / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(str(beside))
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"Cannot read the tokenizer of {path}: {exc}") from None
        context = settings.context_tokens or LLAMACPP_CONTEXT
        threads = compute_threads()
        try:
            # flash attention: 69 -> 85 tokens/s decoding SmolLM2 Q4_K_M on 2 cores (llama.cpp's CPU kernel)
            llm = Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                        flash_attn=True, verbose=False)
        except ValueError as exc:
            raise ModelNotFound(f"llama.cpp cannot load {path}: {exc}") from None
        import llama_cpp

        context = min(context, llama_cpp.llama_model_n_ctx_train(llm.model))
        eos = end_of_generation_tokens(llm)
        desc = f"{path.name} (llama.cpp, {threads} threads, context {context})"
        return cls(llm, tokenizer, context, desc, eos)

    def close(self) -> None:
        with self.lock:
            self.model.close()  # now, not in llama-cpp-python's __del__ at interpreter exit (it fails there)

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
        from worker.batching import _incremental_decoder

        ids = self.encode(messages, continue_final=continue_final)
        generation = Generation(pieces=iter(()), prompt_tokens=len(ids))
        if len(ids) + max_new_tokens > self.context_tokens:
            raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new do not fit the context of {self.context_tokens}")
        llm = self.model
        sampling = dict(temp=0.0) if gen.temperature <= 0 else dict(temp=gen.temperature, top_p=gen.top_p, top_k=TOP_K)

        def pieces() -> Iterator[str]:
            decode = _incremental_decoder(self.tokenizer)
            count = 0
            text = ""
            with self.lock:
                tokens = llm.generate(ids, min_p=0.0, repeat_penalty=gen.repetition_penalty, reset=True, **sampling)
                try:
                    for token in tokens:
                        if token in self.eos and not ignore_eos:
                            break
                        count += 1
                        piece = decode([token])
                        if piece:
                            text += piece
                            yield piece
                        if count >= max_new_tokens:
                            generation.finish_reason = "length"
                            break
                        if stop_at_newline and text.strip() and "\n" in text.lstrip():
                            break
                        if should_stop():
                            generation.finish_reason = "cancelled"
                            break
                finally:
                    tokens.close()
                    generation.completion_tokens = count

        generation.pieces = pieces()
        return generation
