"""Training: SFT with checkpoint resume, data loading, the hyperparameter sweep, export (issue 5).

This file stays light (no torch, trl, transformers or peft at import): `shallow train` asks it whether unsloth will
train before anything imports them, since unsloth must be imported first."""
from __future__ import annotations

from shared.errors import ConfigError


def unsloth_backend(backend: str) -> bool:
    """Whether `--backend BACKEND` trains with unsloth: `unsloth` (CUDA needed), `auto` where CUDA and unsloth are
    there, `transformers` never."""
    import importlib.util

    import torch

    backend = str(backend).lower()
    if backend == "unsloth":
        if not torch.cuda.is_available():
            raise ConfigError("--backend unsloth needs CUDA; use --backend transformers here")
        return True
    if backend == "transformers":
        return False
    if backend != "auto":
        raise ConfigError(f"--backend must be auto, unsloth or transformers, got {backend!r}")
    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None
