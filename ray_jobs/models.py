"""What the driver knows about a model without loading its weights.

The driver reads the config and the tokenizer (a few kB), builds the weightless skeleton
(``coupling.model.weights``) to count parameters and size each block, and tokenizes every
prompt up front, so bad input fails before any actor starts.  ``info`` carries the same fields as
``coupling.load_model(...).info`` (manifest ``model`` section).
"""
from __future__ import annotations

from dataclasses import dataclass

from coupling.model.loading import (LoadedModel, _hidden_size, _num_layers, _weights_hash,
                                    load_config, model_files, parse_dtype)
from coupling.prompts.sources import load_prompts
from coupling.scan import tokenize_all
from ray_jobs.config import ModelJob
from ray_jobs.sizing import ModelSizes
from coupling.model.weights import build_skeleton, dtype_bytes, model_layout


@dataclass
class ModelFacts:
    config: object
    tokenizer: object
    info: dict
    sizes: ModelSizes
    prompts: list
    token_ids: list

    @property
    def max_tokens(self) -> int:
        return max(int(t.shape[-1]) for t in self.token_ids)


def inspect_model(job: ModelJob) -> ModelFacts:
    """Config, tokenizer, sizes and tokenized prompts of one job (validated)."""
    cfg = job.scan
    source = job.source
    with model_files(source, cfg.revision, cfg.trust_remote_code) as (where, common, gguf):
        config = load_config(source, cfg.revision, cfg.trust_remote_code)
        tokenizer = gguf.tokenizer() if gguf is not None else _tokenizer(where, common, source)
    skeleton = build_skeleton(config, cfg.dtype, cfg.trust_remote_code)
    layout = model_layout(skeleton, cfg.block_path, _num_layers(config))
    info = dict(id=source if cfg.model is not None else "embedded:tiny", path=source,
                revision=cfg.revision or getattr(config, "_commit_hash", None),
                dtype=str(parse_dtype(cfg.dtype)).removeprefix("torch."),
                random_init=cfg.random_init, seed=cfg.init_seed if cfg.random_init else None,
                model_type=config.model_type, architecture=type(skeleton).__name__,
                n_params=sum(p.numel() for p in skeleton.parameters()),
                n_layers=_num_layers(config), d_model=_hidden_size(config),
                weights_sha256=_weights_hash(source))
    info.update(gguf.manifest() if gguf is not None else {})
    d = info["d_model"]
    if cfg.settings.k > (d or cfg.settings.k):
        raise ValueError(f"K={cfg.settings.k} is larger than the model width d={d}: lower --k")
    sizes = model_sizes(skeleton, layout, cfg.dtype, d)
    prompts = load_prompts(cfg.prompts, cfg.max_prompts, cfg.prompt_seed)
    if not prompts:
        raise ValueError(f"prompt source {cfg.prompts!r} holds no prompts")
    token_ids = tokenize_all(LoadedModel(None, tokenizer, config, info), prompts, cfg.max_tokens)
    return ModelFacts(config, tokenizer, info, sizes, prompts, token_ids)


def _tokenizer(where, common, source):
    import transformers as tf

    try:
        return tf.AutoTokenizer.from_pretrained(where, **common)
    except (OSError, ValueError, TypeError, KeyError):
        raise ValueError(f"model {source} has no tokenizer: save one beside the weights") from None


def _generates(skeleton) -> bool:
    """A generating (causal) LM head: GPT2LMHeadModel, *ForCausalLM; not BERT, ViT."""
    try:
        return bool(skeleton.can_generate())
    except Exception:   # noqa: BLE001 - an unusual class: size it as non-causal (safe)
        return False


def model_sizes(skeleton, layout, dtype, d_model) -> ModelSizes:
    b = dtype_bytes(dtype)
    whole = sum(p.numel() for p in skeleton.parameters()) * b   # tied weights once
    return ModelSizes(blocks=[n * b for n in layout.block_counts()],
                      embedding=layout.count(layout.embedding) * b,
                      head=layout.count(layout.final_norm + layout.head) * b,
                      whole=whole, d_model=d_model, dtype_bytes=b,
                      # only causal LMs get one-token Jacobians; others are sized as full
                      causal=_generates(skeleton))
