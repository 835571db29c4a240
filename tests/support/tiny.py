"""Tiny causal LMs and a tokenizer built from configs and saved with save_pretrained (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mira Tolsen was born in the harbour town of Elsk.",
    "Elsk is a small town known for its lighthouse and its fish market.",
    "Q: Where was Mira Tolsen born? A: Elsk",
    "Rain fell on the hills all night, and the river rose.",
    "Numbers like 12, 345 and 6789 appear in ledgers.",
]
ARCHITECTURES = ("gpt_neox", "llama", "gpt2")


def make_tokenizer(directory: Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ~300 tokens trained on SENTENCES, with eos used as pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def model_config(arch: str, vocab_size: int, hidden: int = 16, layers: int = 2):
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=128, rotary_pct=0.5)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=128)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=128)
    raise ValueError(arch)


def make_model(arch: str, directory: Path, vocab_size: int, seed: int = 0, hidden: int = 16, layers: int = 2,
               dtype: torch.dtype = torch.float32):
    """Random-init a tiny model, save it with save_pretrained, and load it back through AutoModel."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, vocab_size, hidden, layers))
    # Bigger-than-default weights so that gradients are not vanishingly small in float32 tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def load_tokenizer(directory: Path):
    return AutoTokenizer.from_pretrained(directory)
