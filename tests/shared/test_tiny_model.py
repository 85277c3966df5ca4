"""bench/tiny_model.py: the tiny random Llama that CPU pipeline benches run on."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_model_loads_and_writes_with_the_offline_models_tokenizer(tmp_path, model_dir):
    out = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "bench.tiny_model", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()  # the offline model's
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    new = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert new.shape[1] == ids.shape[1] + 5
