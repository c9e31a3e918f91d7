"""Small random-init models of each supported family, built offline from configs.

Used by the tests, the benchmarks and the Ray tests (no hub access is needed): a model is
built from a config, optionally saved with ``save_pretrained`` and reloaded like any
checkpoint.  ``shape="gpt2-small"`` / ``"llama-1b"`` give realistic widths for benchmarks.
"""
from __future__ import annotations

import torch

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "phi", "falcon",
            "bert", "vit")
CAUSAL = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "phi", "falcon")


def small_config(family: str, n_layers: int = 2, d: int = 32, heads: int = 4,
                 vocab: int = 128, ffn: int | None = None, max_pos: int = 128):
    import transformers as tf

    ffn = ffn or 2 * d
    common_dec = dict(num_hidden_layers=n_layers, hidden_size=d, intermediate_size=ffn,
                      num_attention_heads=heads, vocab_size=vocab,
                      max_position_embeddings=max_pos)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=n_layers, n_embd=d, n_head=heads, vocab_size=vocab,
                             n_positions=max_pos, n_inner=ffn, bos_token_id=0, eos_token_id=0,
                             architectures=["GPT2LMHeadModel"])
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common_dec, rotary_pct=0.25, bos_token_id=0, eos_token_id=0,
                                architectures=["GPTNeoXForCausalLM"])
    if family == "llama":
        return tf.LlamaConfig(**common_dec, num_key_value_heads=max(1, heads // 2),
                              architectures=["LlamaForCausalLM"])
    if family == "mistral":
        return tf.MistralConfig(**common_dec, num_key_value_heads=max(1, heads // 2),
                                sliding_window=None, architectures=["MistralForCausalLM"])
    if family == "qwen2":
        return tf.Qwen2Config(**common_dec, num_key_value_heads=max(1, heads // 2),
                              architectures=["Qwen2ForCausalLM"])
    if family == "gemma":
        return tf.GemmaConfig(**common_dec, num_key_value_heads=1, head_dim=d // heads,
                              architectures=["GemmaForCausalLM"])
    if family == "phi":
        return tf.PhiConfig(**common_dec, partial_rotary_factor=0.5,
                            architectures=["PhiForCausalLM"])
    if family == "falcon":
        return tf.FalconConfig(num_hidden_layers=n_layers, hidden_size=d,
                               num_attention_heads=heads, vocab_size=vocab,
                               new_decoder_architecture=False, multi_query=True, alibi=False,
                               bos_token_id=0, eos_token_id=0, architectures=["FalconForCausalLM"])
    if family == "bert":
        return tf.BertConfig(num_hidden_layers=n_layers, hidden_size=d, intermediate_size=ffn,
                             num_attention_heads=heads, vocab_size=vocab,
                             max_position_embeddings=max_pos, architectures=["BertForMaskedLM"])
    if family == "vit":
        return tf.ViTConfig(num_hidden_layers=n_layers, hidden_size=d, intermediate_size=ffn,
                            num_attention_heads=heads, image_size=32, patch_size=8,
                            num_channels=3, architectures=["ViTModel"])
    raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")


def shaped_config(shape: str, n_layers: int | None = None):
    """Realistic widths for benchmarks: ``gpt2-small`` (d=768), ``llama`` (d=1024, GQA) and
    ``llama-7b`` (d=4096, Llama-2-7B's block shape; for GPU runs)."""
    import transformers as tf

    if shape == "gpt2-small":
        return tf.GPT2Config(n_layer=n_layers or 12, n_embd=768, n_head=12, vocab_size=50257,
                             n_positions=1024, architectures=["GPT2LMHeadModel"])
    if shape == "llama":
        return tf.LlamaConfig(num_hidden_layers=n_layers or 12, hidden_size=1024,
                              intermediate_size=2816, num_attention_heads=16,
                              num_key_value_heads=4, vocab_size=32000,
                              architectures=["LlamaForCausalLM"])
    if shape == "llama-7b":
        return tf.LlamaConfig(num_hidden_layers=n_layers or 32, hidden_size=4096,
                              intermediate_size=11008, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000,
                              architectures=["LlamaForCausalLM"])
    raise ValueError(f"unknown shape {shape!r}: use gpt2-small, llama or llama-7b")


def build_random(config, seed: int = 0, dtype=torch.float32):
    """A random-init model (eager attention, eval mode) for ``config``."""

    from coupling.model.loading import _model_class

    torch.manual_seed(seed)
    model = _model_class(config).from_config(config, attn_implementation="eager", dtype=dtype)
    return model.eval().requires_grad_(False)


def random_inputs(family: str, n_tokens: int = 6, vocab: int = 128, seed: int = 0) -> dict:
    """Inputs for one example: token ids, or pixel values for a ViT."""
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn((1, 3, 32, 32), generator=gen)}
    return {"input_ids": torch.randint(0, vocab, (1, n_tokens), generator=gen)}


def save_random(family_or_config, folder, seed: int = 0, tokenizer=None, **kw) -> str:
    """Build a random model and ``save_pretrained`` it (safetensors) into ``folder``."""
    config = (small_config(family_or_config, **kw) if isinstance(family_or_config, str)
              else family_or_config)
    model = build_random(config, seed)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)
