"""A compressed Llama-family decoder (hidden width, output-error budget, FFN and linear sites) serves like any causal
LM: plain and `trust_remote_code` reloads (the latter where hf_rmtkd cannot be imported), `generate()` and
`pipeline("text-generation")`, with the same greedy tokens as the model that was saved."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from testing_utils import planted_llama, token_ids
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_rmtkd


def _word_tokenizer(vocab_size: int) -> tf.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder")
    model, _ = planted_llama(k=12)
    tokenizer = _word_tokenizer(model.config.vocab_size)
    batches = [{"input_ids": token_ids(seed)} for seed in range(8)]
    compressed = hf_rmtkd.compress(
        model, batches, hidden_width=True, max_output_error=0.05, processing_class=tokenizer, progress=False
    )
    assert compressed.config.hidden_width is not None and compressed.config.reduced_modules
    compressed.save_pretrained(folder)
    prompt = token_ids(seed=50)[:1, :5]
    expected = compressed.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)
    torch.save({"prompt": prompt, "expected": expected}, folder / "expected.pt")
    return folder, expected, prompt


def test_plain_reload_generates_the_same_tokens(saved):
    folder, expected, prompt = saved
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, hf_rmtkd.RMTKDForCausalLM)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1), expected)


def test_text_generation_pipeline(saved):
    folder, expected, prompt = saved
    generate = tf.pipeline("text-generation", model=str(folder))
    text = " ".join(f"w{int(i)}" for i in prompt[0])
    out = generate(text, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert out.split() == [f"w{int(i)}" for i in expected[0, prompt.shape[1] :]]


def test_trust_remote_code_reload_without_hf_rmtkd(saved):
    folder, _, _ = saved
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_rmtkd"] = None  # hf_rmtkd cannot be imported in this process
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load({str(folder / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(data["prompt"], max_new_tokens=6, do_sample=False, pad_token_id=1)
        assert torch.equal(out, data["expected"]), (out, data["expected"])
        print("REMOTE-DECODER-OK", model.config.hidden_width["rank"] if isinstance(model.config.hidden_width, dict)
              else model.config.hidden_width.rank)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-DECODER-OK" in result.stdout
