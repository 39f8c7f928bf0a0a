"""A tiny random Llama and a word-level tokenizer, built locally: no hub download."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>"]
BOS, EOS = 1, 2


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over SPECIALS + ``words``."""
    vocab = {token: index for index, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(n_words: int, n_layers: int, seed: int = 0, **config: Any) -> LlamaForCausalLM:
    """A random Llama with d_model 32 over the vocabulary of ``word_tokenizer`` of ``n_words`` words."""
    torch.manual_seed(seed)
    options: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": len(SPECIALS) + n_words,
        "max_position_embeddings": 64,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
    return LlamaForCausalLM(LlamaConfig(**{**options, **config})).eval()
