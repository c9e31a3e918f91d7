"""GPU check: the scan model of the ``scan`` and ``authors`` steps, a random Llama of the
shape in ``gpu_check_common.SHAPES`` (Llama-2-7B's block with GQA, or the smoke shape)."""
from __future__ import annotations

import time

from gpu_check_common import Ctx, sync


def llama_config(shape: dict):
    import transformers as tf

    return tf.LlamaConfig(num_hidden_layers=shape["layers"], hidden_size=shape["d"],
                          intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                          max_position_embeddings=max(256, 2 * shape["n"]),
                          architectures=["LlamaForCausalLM"])


def build_llama(ctx: Ctx):
    """``(LoadedModel, input_ids, info)``: random Llama (eager attention) built on the device.

    ``LoadedModel`` is built directly from the in-memory model (as the tests do);
    ``coupling.load_model`` only reads configs/weights from the hub or a folder.
    """
    import torch

    from coupling.model.loading import LoadedModel, parse_dtype
    from coupling.model.zoo import build_random

    cfg = llama_config(ctx.shape)
    dtype = parse_dtype(ctx.dtype)
    t0 = time.perf_counter()
    with torch.device(ctx.device):       # parameters are created (and initialised) there
        model = build_random(cfg, seed=0, dtype=dtype)
    model = model.to(ctx.device)          # no-op when the device context was honoured
    sync(ctx.device)
    info = {"build_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()),
            "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "dtype": ctx.dtype, **ctx.shape}
    lm = LoadedModel(model, None, cfg, {"n_layers": ctx.shape["layers"]})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ctx.shape["vocab"], (1, ctx.shape["n"]), generator=gen)
    ctx.log(f"model: Llama {ctx.shape['layers']} layers, d={ctx.shape['d']}, "
            f"{ctx.shape['heads']}/{ctx.shape['kv_heads']} heads, ffn {ctx.shape['ffn']}, "
            f"{info['params'] / 1e9:.2f}B params {ctx.dtype} ({info['weights_gb']:.1f} GiB) "
            f"built in {info['build_s']:.1f}s on {lm.device}")
    return lm, ids, info
