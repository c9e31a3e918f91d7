"""Small vision transformers with stochastic depth on scikit-learn's digits (issue 15, item 4).

The paper (Figs. 11-12) reports that stochastic depth raises block coupling in ViTs and that,
at fixed stochastic depth, coupling follows accuracy.  This module trains the ViTs for that
test here, from scratch and on the CPU, and measures their coupling with the project's own
scanner (:func:`coupling.analysis.prompt.analyze_prompt`, the same code as ``coupling scan``).

* Data: the 8x8 grayscale digits that ship inside scikit-learn (1797 images, no network),
  a stratified split fixed by ``seed``, pixels scaled to [0, 1] and standardized with the
  training split's mean and std (one scalar each: border pixels are constant, so per-pixel
  statistics would divide by zero).
* Model: Hugging Face ``ViTForImageClassification`` from a ``ViTConfig`` (eager attention,
  because Jacobians are taken later; no dropout, so stochastic depth is the only noise).
* Stochastic depth: the DeiT/timm linear rule, per sample, whole blocks kept or skipped, by
  forward hooks active in train mode only
  (:mod:`coupling.experiments.study.stochastic_depth`).
* Coupling: ``token="all"`` depth-wise coupling averaged over the CLS token and every patch
  token, ``last_block="with-final-norm"`` by default (``coupling.model.trajectory`` applies ViT's
  final ``layernorm`` to ``X^L``, which Hugging Face leaves out of ``hidden_states``).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coupling.experiments.study.stochastic_depth import drop_path_rates, stochastic_depth

__all__ = ["IMAGE_SIZE", "N_CLASSES", "SKLEARN_HINT", "SUMMARY_KEYS", "load_digits_split",
           "ViTSpec", "build_vit", "load_vit", "torch_threads", "evaluate", "train_vit",
           "loaded_vit", "vit_coupling", "run_vit", "result_row"]

IMAGE_SIZE = 8
N_CLASSES = 10
SKLEARN_HINT = 'pip install scikit-learn (or pip install -e ".[study]")'


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, 1, 8, 8)`` standardized images and
    int64 labels (torch tensors), a stratified split that depends only on ``seed``."""
    if not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError(f"the ViT study needs scikit-learn's digits: {SKLEARN_HINT}") from None
    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0         # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    mean, std = x_tr.mean(), x_tr.std()                 # the training split's only

    def prep(a):
        return torch.from_numpy(((a - mean) / std).astype(np.float32)[:, None])

    return prep(x_tr), torch.from_numpy(y_tr), prep(x_te), torch.from_numpy(y_te)


# ------------------------------------------------------------------------------------------
# The spec and the model
# ------------------------------------------------------------------------------------------
@dataclass
class ViTSpec:
    """One ViT of the grid.

    Defaults (measured on this 2-core machine, one torch thread): 20-25 s of training when
    the machine is otherwise idle (30-45 s beside other jobs), ~95% test accuracy, 4-10 s to
    scan 16 test images with K=10.  ``patch_size=4`` (4
    patches + CLS = 5 tokens) rather than 2 (17 tokens): with 2, a training step costs ~2x
    and a scan ~5x, and the accuracy reached in the same time is far lower.  Steps are
    overhead-bound (~27 ms at batch 16, ~33 ms at 32, ~45 ms at 64), so batch 32 with lr 2e-3
    buys the most progress per second.  The one-pixel shift augmentation is off by default:
    at this budget it held train and test accuracy near 80%.
    """

    name: str
    n_layer: int = 6
    d: int = 48
    n_head: int = 3
    mlp_ratio: int = 4
    patch_size: int = 4
    stochastic_depth: float = 0.0   # p of the last block (DeiT/timm linear rule)
    weight_decay: float = 0.05      # AdamW, on weight matrices only
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    warmup_epochs: int = 1
    seed: int = 0
    augment: bool = False           # random shift by up to one pixel

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"ViTSpec.name must be a non-empty string, got {self.name!r}")
        ints = dict(n_layer=2, d=1, n_head=1, mlp_ratio=1, patch_size=1, epochs=1,
                    batch_size=1, warmup_epochs=0, seed=0)
        for field_, low in ints.items():
            v = getattr(self, field_)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"ViTSpec.{field_} must be an integer >= {low}, got {v!r}")
        if self.d % self.n_head:
            raise ValueError(f"ViTSpec.d={self.d} is not divisible by n_head={self.n_head}: "
                             "pick d a multiple of n_head")
        if IMAGE_SIZE % self.patch_size:
            raise ValueError(f"ViTSpec.patch_size={self.patch_size} does not divide the "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE} images: use 1, 2, 4 or 8")
        self._check_float("stochastic_depth", 0.0, 1.0, high_open=True)
        self._check_float("weight_decay", 0.0, math.inf)
        self._check_float("lr", 0.0, math.inf, low_open=True)
        if not isinstance(self.augment, bool):
            raise ValueError(f"ViTSpec.augment must be true or false, got {self.augment!r}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"ViTSpec.warmup_epochs={self.warmup_epochs} exceeds "
                             f"epochs={self.epochs}: lower it")

    def _check_float(self, field_, low, high, low_open=False, high_open=False):
        v = getattr(self, field_)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"ViTSpec.{field_} must be a number in {span}, got {v!r}")


def build_vit(spec: ViTSpec):
    """A fresh ``ViTForImageClassification`` for ``spec`` (seeded, eager attention)."""
    import transformers as tf

    config = tf.ViTConfig(image_size=IMAGE_SIZE, num_channels=1, patch_size=spec.patch_size,
                          hidden_size=spec.d, num_hidden_layers=spec.n_layer,
                          num_attention_heads=spec.n_head,
                          intermediate_size=spec.mlp_ratio * spec.d, num_labels=N_CLASSES,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          architectures=["ViTForImageClassification"])
    torch.manual_seed(spec.seed)
    return tf.ViTForImageClassification._from_config(config, attn_implementation="eager")


def load_vit(folder):
    """A ViT saved by :func:`run_vit` (``out_dir/model``), eval mode, frozen, eager attention.

    (``coupling.model.loading.load_model`` would build a bare ``ViTModel``, whose pooler the
    classifier checkpoint lacks, and refuse it.)"""
    import transformers as tf

    model = tf.ViTForImageClassification.from_pretrained(str(folder), attn_implementation="eager")
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def _param_groups(model, weight_decay: float):
    """Weight decay on weight matrices only (timm's rule: not on biases, norms, the CLS token
    or the position embeddings)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim >= 2 and "position_embeddings" not in name and "cls_token" not in name
        (decay if matrix else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _shift(x: torch.Tensor, background: float, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by (-1, 0 or +1) pixels in each direction, edges filled with ``background``."""
    padded = F.pad(x, (1, 1, 1, 1), value=background)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(3):
        for j in range(3):
            m = (offsets[:, 0] == i) & (offsets[:, 1] == j)
            out[m] = padded[m, :, i:i + IMAGE_SIZE, j:j + IMAGE_SIZE]
    return out


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: unchanged) for the block, then restored.
    One thread is fastest here: these models are tiny, and on a busy 2-core machine two
    threads made a training step 4-6x slower (OpenMP waits)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def evaluate(model, x, y, device="cpu", batch_size: int = 512) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` in eval mode."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(pixel_values=x[i:i + batch_size].to(device)).logits.float()
        yb = y[i:i + batch_size].to(device)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    model.train(was)
    return correct / len(x), loss / len(x)


def train_vit(spec: ViTSpec, data, device: str = "cpu", threads: int | None = None, log=print):
    """Train ``spec`` on ``data`` (:func:`load_digits_split`); returns ``(model, record)``.

    AdamW (betas 0.9/0.999) with linear warm-up and cosine decay per step, stochastic depth
    by hooks (removed before returning), seeded: the same spec, data, device and thread count
    give the same weights.  The model comes back in eval mode with frozen parameters.
    """
    x_tr, y_tr, x_te, y_te = data
    with torch_threads(threads):
        t0 = time.perf_counter()
        model = build_vit(spec).to(device)
        curve = _train_loop(model, spec, x_tr, y_tr, x_te, y_te, device)
        train_s = time.perf_counter() - t0
        test_acc, test_loss = evaluate(model, x_te, y_te, device)
        train_acc, train_loss = evaluate(model, x_tr, y_tr, device)
        used_threads = torch.get_num_threads()
    model.eval().requires_grad_(False)
    record = dict(test_acc=test_acc, test_loss=test_loss, train_acc=train_acc,
                  train_loss=train_loss, params=sum(p.numel() for p in model.parameters()),
                  train_s=train_s, threads=used_threads, device=str(device),
                  drop_path_rates=drop_path_rates(spec.n_layer, spec.stochastic_depth),
                  curve=curve)
    log(f"{spec.name}: test acc {test_acc:.3f}, loss {test_loss:.3f}, train acc "
        f"{train_acc:.3f}, {train_s:.1f} s")
    return model, record


def _train_loop(model, spec, x_tr, y_tr, x_te, y_te, device) -> list[dict]:
    torch.manual_seed(spec.seed)                        # drop-path masks (global RNG)
    gen = torch.Generator().manual_seed(spec.seed)      # data order and shifts
    opt = torch.optim.AdamW(_param_groups(model, spec.weight_decay), lr=spec.lr,
                            fused=True)   # one kernel per step: the step is overhead-bound
    steps_per_epoch = math.ceil(len(x_tr) / spec.batch_size)
    total, warmup = spec.epochs * steps_per_epoch, spec.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, warmup, total))
    background = float(x_tr.min())                      # the value of a blank pixel
    curve = []
    model.train()
    with stochastic_depth(model, spec.stochastic_depth):
        for epoch in range(spec.epochs):
            order = torch.randperm(len(x_tr), generator=gen)
            seen, loss_sum, correct = 0, 0.0, 0
            for i in range(0, len(order), spec.batch_size):
                idx = order[i:i + spec.batch_size]
                xb = _shift(x_tr[idx], background, gen) if spec.augment else x_tr[idx]
                xb, yb = xb.to(device), y_tr[idx].to(device)
                logits = model(pixel_values=xb).logits
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(idx)
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(-1) == yb).sum())
            test_acc, test_loss = evaluate(model, x_te, y_te, device)
            curve.append(dict(epoch=epoch + 1, train_loss=loss_sum / seen,
                              train_acc=correct / seen, test_acc=test_acc, test_loss=test_loss,
                              lr=opt.param_groups[0]["lr"]))
    model.eval()
    return curve


# ------------------------------------------------------------------------------------------
# Coupling
# ------------------------------------------------------------------------------------------
SUMMARY_KEYS = {"mis_coupling": "depth_mis_coupling_mean",
                "mis_coupling_raw": "depth_mis_coupling_raw_mean", "lss": "lss",
                "expodistance": "expodistance",
                "undetermined_layers": "depth_undetermined_layers"}


def loaded_vit(model, name: str = "vit"):
    """``model`` as a :class:`coupling.model.loading.LoadedModel` (no image processor is needed:
    the images are already tensors)."""
    from coupling.model.loading import LoadedModel

    c = model.config
    info = dict(id=name, path=None, revision=None, dtype="float32", random_init=False,
                model_type=c.model_type, architecture=type(model).__name__,
                n_params=sum(p.numel() for p in model.parameters()),
                n_layers=c.num_hidden_layers, d_model=c.hidden_size)
    return LoadedModel(model, None, c, info)


def vit_coupling(model, x_images, k: int = 10, settings=None, name: str = "vit") -> dict:
    """Coupling of a trained ViT on images ``x_images`` (``(N, 1, 8, 8)``), one scan each.

    ``settings``: a :class:`coupling.settings.schema.scan_settings.ScanSettings` (default ``k``, ``token="all"``,
    depth and regularity).  Returns the mean and std over images of m~ (``mis_coupling``),
    the raw m~, LSS, expodistance and undetermined layers, the mean ``(L, L)`` normalized
    grid (``coupling_matrix``) and the per-image values (``per_image``).  The model is
    scanned in eval mode with frozen parameters; both are restored afterwards.
    """
    from coupling.analysis.prompt import analyze_prompt
    from coupling.settings.scan_settings import ScanSettings

    settings = settings or ScanSettings(k=k, token="all", measures=("depth", "regularity"))
    if settings.k > model.config.hidden_size:
        raise ValueError(f"K={settings.k} is larger than the ViT width d="
                         f"{model.config.hidden_size}: lower k")
    if len(x_images) == 0:
        raise ValueError("vit_coupling needs at least one image")
    lm = loaded_vit(model, name)
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    try:
        results = [analyze_prompt(lm, {"pixel_values": x[None].to(lm.device)}, settings,
                                  prompt_id=f"image-{i}") for i, x in enumerate(x_images)]
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    per_image = {key: [float(r.summary[src]) for r in results]
                 for key, src in SUMMARY_KEYS.items() if src in results[0].summary}
    out = {"n_images": len(results), "k": settings.k, "last_block": settings.last_block,
           "token": settings.token, "scan_s": time.perf_counter() - t0}
    for key, values in per_image.items():
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values))
    out["coupling_matrix"] = np.mean([r.depth_normalized for r in results], axis=0)
    out["per_image"] = per_image
    return out


# ------------------------------------------------------------------------------------------
# One model of the grid: train, save, measure, record
# ------------------------------------------------------------------------------------------
def run_vit(spec: ViTSpec, data, out_dir, k: int = 10, n_images: int = 16, device: str = "cpu",
            threads: int | None = None, log=print) -> dict:
    """Train ``spec``, save it (``out_dir/model/``), scan ``n_images`` test images, write
    ``out_dir/result.json`` atomically; returns the table row."""
    from coupling.results.owned import atomic_write

    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if k > spec.d:
        raise ValueError(f"K={k} is larger than the ViT width d={spec.d}: lower k or widen d")
    out_dir = Path(out_dir)
    model, record = train_vit(spec, data, device=device, threads=threads, log=log)
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    with torch_threads(threads):
        cp = vit_coupling(model, data[2][:n_images], k=k, name=spec.name)
    log(f"{spec.name}: m~ {cp['mis_coupling']:.3f} +- {cp['mis_coupling_std']:.3f} over "
        f"{cp['n_images']} images, {cp['scan_s']:.1f} s")
    row = result_row(spec, record, cp)
    coupling = {key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in cp.items()}
    doc = {"format": "coupling-vit-result/1", "spec": asdict(spec), "row": row,
           "training": record, "coupling": coupling}
    atomic_write(out_dir / "result.json", json.dumps(doc, indent=1).encode())
    return row


def result_row(spec: ViTSpec, record: dict, cp: dict) -> dict:
    """The tidy-table row of one trained and scanned ViT."""
    return dict(model=spec.name, seed=spec.seed, stochastic_depth=spec.stochastic_depth,
                weight_decay=spec.weight_decay, n_layer=spec.n_layer, d=spec.d,
                params=record["params"], test_acc=record["test_acc"],
                test_loss=record["test_loss"], train_acc=record["train_acc"],
                mis_coupling=cp["mis_coupling"], mis_coupling_std=cp["mis_coupling_std"],
                mis_coupling_raw=cp["mis_coupling_raw"], coupling=1.0 - cp["mis_coupling"],
                lss=cp.get("lss", float("nan")),
                expodistance=cp.get("expodistance", float("nan")),
                undetermined_layers=cp["undetermined_layers"], k=cp["k"],
                n_images=cp["n_images"], train_s=record["train_s"], scan_s=cp["scan_s"])
