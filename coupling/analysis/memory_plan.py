"""How much memory a local scan takes, predicted before anything is loaded, and where its
weights live while it runs.

The prediction reads the model's config (a weightless skeleton gives every part's parameter
count, :mod:`coupling.model.weights`) and the safetensors headers (the bytes on disk).  The
host peak is the interpreter's resident set when planning (Python, torch, transformers) plus:

``weights``
    ``memory`` mode: every parameter in the scan dtype.  ``disk`` mode: the embedding, final
    norm and head only; each block is read from the safetensors files for its turn.
``block``
    the one block being worked on, in float32 (:mod:`coupling.analysis.depth_passes`): a copy
    of a bf16/fp16 block (nothing for float32 weights in memory), or its tensors read from disk.
``work``
    the larger of a batch of one-token products through a block (activations of the
    forward and the backward) and, on the dense route (``may_be_dense``), a dense ``J``,
    its SVD and the dense Jacobians kept between the passes (at most one block's worth).
``load``
    what loading holds beside the weights: the file pages of tensors converted to the scan
    dtype, or, for a GGUF file, the tensor being dequantized (float32, as a numpy array and
    its torch copy: twice the largest tensor).
``states``, ``factors``, ``lens``
    ``X^0..X^L`` and the recorded calls (with float32 blocks' keys/values); ``U, V``
    (``d x K``) and ``S`` of every layer and traced token; the logit-lens entropy's work: a
    thousand states against two thousand words of the unembedding at a time (one layer's
    logits whole when the head is not a plain linear layer).

Only ``weights`` grows with depth in ``memory`` mode, and only ``states`` and ``factors`` (a
few MB per block) in ``disk`` mode.  ``auto`` picks ``memory`` when its peak fits in the
memory available now with :data:`HEADROOM` to spare, else ``disk``; when even ``disk`` does
not fit, :class:`MemoryPlanError` says so in one line, before anything is loaded or written.

On a GPU (``--device cuda``) the same parts are the *device* peak: the weights, the block
being worked on and everything computed live there.  The host then holds the interpreter
and the file pages being copied to the device: while loading (``memory``: Accelerate puts
each tensor straight on the device) or, in ``disk`` mode, the block being read for its turn.
``auto`` then compares the device's free memory instead of the host's.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from coupling.measures.regularity import lens_work_bytes
from coupling.model import memory
from coupling.model.memory import gb
from coupling.spectrum.svd import may_be_dense

WEIGHT_MODES = ("auto", "memory", "disk")
HEADROOM = 0.8          # auto: memory mode only when its peak is under 80% of what is free
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


class MemoryPlanError(ValueError):
    """The scan cannot fit in this machine's memory, even one block at a time."""


@dataclass
class ParamCounts:
    """Parameter counts of a model's parts (a tied head counted once, with the embedding)
    and, for a local folder, what its safetensors files hold."""

    blocks: list                 # parameters of each block
    other: int                   # embedding, final norm, head: everything outside the blocks
    embedding: int               # the input embedding when it is not tied to the head, else 0
    d: int
    vocab: int
    ffn: int
    heads: int
    disk_bytes: int | None = None          # the safetensors files' tensor bytes
    disk_params: int | None = None         # ... and their element count
    dequantized: bool = False              # a GGUF file, dequantized while it is loaded
    largest: int = 0                       # elements of the largest tensor
    linear_head: bool = True               # the unembedding is a plain nn.Linear (streamed lens)

    @property
    def n_params(self) -> int:
        return sum(self.blocks) + self.other

    @property
    def file_bytes(self) -> float | None:
        """Bytes per parameter on disk (2 for a bf16 checkpoint), None without files."""
        return self.disk_bytes / self.disk_params if self.disk_params else None


def param_counts(config, folder=None, dequantized: bool = False) -> ParamCounts:
    """:class:`ParamCounts` of ``config`` from its weightless skeleton (and the safetensors
    headers of ``folder`` when it is a local folder); ``dequantized``: the weights are a GGUF
    file's, dequantized while loading."""
    from coupling.model.blocks import find_blocks
    from coupling.model.loading import _hidden_size, _num_layers
    from coupling.model.trajectory import is_plain_linear
    from coupling.model.weights import build_skeleton

    model = build_skeleton(config)
    _, blocks = find_blocks(model, None, _num_layers(config))
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in model.parameters())          # shared tensors once
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out is not None and inp is not None and out.weight is inp.weight
    embedding = 0 if inp is None or tied else inp.weight.numel()
    vocab = out.weight.shape[0] if out is not None else 0
    ffn = next((getattr(config, n) for n in ("intermediate_size", "n_inner", "ffn_dim")
                if isinstance(getattr(config, n, None), int)), None) or 4 * _hidden_size(config)
    heads = next((getattr(config, n) for n in ("num_attention_heads", "n_head")
                  if isinstance(getattr(config, n, None), int)), 1)
    sizes = ParamCounts(per_block, total - sum(per_block), embedding, _hidden_size(config),
                       vocab, ffn, heads, dequantized=dequantized,
                       largest=max((p.numel() for p in model.parameters()), default=0),
                       linear_head=out is None or is_plain_linear(out))
    if folder is not None and Path(str(folder)).is_dir():
        sizes.disk_bytes, sizes.disk_params = safetensors_bytes(folder)
    return sizes


def safetensors_bytes(folder) -> tuple:
    """``(bytes, elements)`` of the tensors in a folder's ``*.safetensors`` files, from their
    headers alone (nothing else is read); ``(None, None)`` when there are none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None, None
    total, elements = 0, 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                start, end = t["data_offsets"]
                total += end - start
                elements += math.prod(t["shape"])
    return total, elements


@dataclass
class MemoryPlan:
    """The predicted host peak of one mode, its parts (bytes), and why the mode was chosen."""

    mode: str
    reason: str
    parts: dict
    baseline_bytes: int
    available_bytes: int | None
    disk_read_bytes: int = 0       # read from disk per prompt (disk mode: each block 3 times)
    device: str = "cpu"
    device_parts: dict | None = None            # a GPU scan: the device's parts (bytes)
    device_available_bytes: int | None = None   # ... and its free memory now

    @property
    def predicted_bytes(self) -> int:
        """Above the interpreter's baseline."""
        return peak_of(self.parts)

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.predicted_bytes

    @property
    def device_peak_bytes(self) -> int | None:
        """The predicted device peak of a GPU scan (None on the CPU)."""
        return None if self.device_parts is None else peak_of(self.device_parts)

    def to_dict(self) -> dict:
        out = {"mode": self.mode, "reason": self.reason, "parts_bytes": dict(self.parts),
               "baseline_bytes": self.baseline_bytes,
               "predicted_peak_bytes": self.peak_bytes,
               "available_bytes": self.available_bytes,
               "disk_read_bytes_per_prompt": self.disk_read_bytes, "device": self.device}
        if self.device_parts is not None:
            out.update(device_parts_bytes=dict(self.device_parts),
                       predicted_device_peak_bytes=self.device_peak_bytes,
                       device_available_bytes=self.device_available_bytes)
        return out

    def lines(self) -> list:
        """What ``coupling scan --dry-run`` prints."""
        parts = ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items())
        out = [f"weights    {self.mode}: {self.reason}",
               f"memory     predicted host peak {gb(self.peak_bytes)} = interpreter "
               f"{gb(self.baseline_bytes)} + {parts} (loading and block+work are not "
               "at the same time: the larger counts)"]
        if self.available_bytes is not None:
            out.append(f"available  {gb(self.available_bytes)} on this machine now")
        if self.device_parts is not None:
            parts = ", ".join(f"{k} {gb(v)}" for k, v in self.device_parts.items() if v)
            free = ("" if self.device_available_bytes is None else
                    f"; {gb(self.device_available_bytes)} free on it now")
            out.append(f"device     {self.device}: predicted peak {gb(self.device_peak_bytes)} "
                       f"= {parts}{free}")
        if self.disk_read_bytes:
            out.append(f"disk       {gb(self.disk_read_bytes)} read per prompt (each block: "
                       "forward, pass 1, pass 2)")
        return out


def predict(sizes: ParamCounts, mode: str, dtype: str, settings, n_tokens: int) -> dict:
    """The parts (bytes) of the host peak of ``mode`` (``memory`` | ``disk``): see the module
    docstring and :meth:`MemoryPlan.predicted_bytes` for how they add up.

    Safetensors are memory-mapped: a tensor already in the scan dtype is used in place, so
    only the pages it touches are resident (the input embedding's: the prompt's rows only);
    a tensor converted to another dtype is a copy, and the file pages read for it stay
    resident until its file is closed (``load``: the whole file while transformers loads it,
    the block's tensors while a block is held)."""
    b = BYTES[str(dtype)]
    fb = sizes.file_bytes or b
    same = fb == b                               # used in place, no conversion copy
    L, d, n, k = len(sizes.blocks), sizes.d, n_tokens, settings.k
    block = max(sizes.blocks, default=0)
    traced = n if settings.token == "all" else 1
    if mode == "memory":
        weights = (sizes.n_params - sizes.embedding) * b if same else sizes.n_params * b
        load = 0 if same else (sizes.disk_bytes or 0)
        if sizes.dequantized:    # transformers dequantizes one tensor at a time: a float32
            load = 2 * sizes.largest * 4    # numpy array and its torch copy, beside the weights
        block_bytes = 0 if b == 4 else 4 * block
    else:
        weights = (sizes.other - sizes.embedding) * b if same else sizes.other * b
        load = 0 if same else int(sizes.other * fb)
        # held: its file pages, plus the float32 tensors unless those are the pages
        # themselves; --deflate-ln holds it in the scan dtype and copies it to float32
        if settings.deflate_ln:
            block_bytes = block * (fb + (0 if same else b) + (0 if b == 4 else 4))
        else:
            block_bytes = block * (fb + (0 if fb == 4 and b == 4 else 4))
    chunk = settings.chunk or 128
    # one batch of one-token products: per copy ~12 d-vectors, 4 ffn-vectors and the
    # attention rows (prefix + batch) per head, kept for the backward and again in it
    vjp = 2 * chunk * (12 * d + 4 * sizes.ffn + 3 * sizes.heads * (n + chunk)) * 4
    dense = 0
    if may_be_dense(settings.svd, d, k):
        dense = 5 * d * d * 4 + min(traced * L * d * d, block) * 4
    # float32 blocks' keys/values, recorded in the forward for the fast path (at most d
    # wide each: fewer with grouped-query attention)
    kv = 8 * L * n * d if b == 4 else 0
    return {"weights": int(weights), "load": int(load), "block": int(block_bytes),
            "work": int(max(vjp, dense)),
            "states": (L + 1) * n * d * (8 + 2 * b) + L * n * d * b + kv,
            "factors": traced * L * (2 * d * k + k + 1) * 8,
            "lens": (lens_work_bytes(n, L + 1, d, sizes.vocab, sizes.linear_head)
                     if "regularity" in settings.measures else 0)}


def peak_of(parts: dict) -> int:
    """Loading and the block being worked on are not at the same time: the peak holds the
    larger of the two, and everything else."""
    rest = sum(v for key, v in parts.items() if key not in ("load", "block", "work"))
    return int(rest + max(parts["load"], parts["block"] + parts["work"]))


def on_device(parts: dict, mode: str, sizes: ParamCounts) -> tuple:
    """``(host parts, device parts)`` of a GPU scan from the parts of :func:`predict`:
    everything but the file pages moves to the device; the host keeps the pages being
    copied (``memory``: the largest block's while loading; ``disk``: the block read for
    its turn)."""
    fb = sizes.file_bytes or 4
    pages = int(max(sizes.blocks, default=0) * fb)
    host = dict.fromkeys(parts, 0)
    host["load" if mode == "memory" else "block"] = pages
    return host, {**parts, "load": 0}


def plan(sizes: ParamCounts, dtype: str, settings, n_tokens: int, weights: str = "auto",
         disk_ok: bool = True, available: int | None = None,
         baseline: int | None = None, device: str = "cpu",
         device_available: int | None = None) -> MemoryPlan:
    """The mode (``weights``: auto | memory | disk) and its :class:`MemoryPlan`.
    ``disk_ok``: the weights are local safetensors files (else only ``memory``);
    ``available``/``baseline``: default this machine's free memory / this process's RSS;
    ``device``: ``cuda[:N]`` plans a GPU scan, whose ``auto`` compares the predicted device
    peak with ``device_available`` (that GPU's free memory)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    host_free = memory.available()["host_bytes"] if available is None else available
    baseline = memory.rss() if baseline is None else baseline
    parts = {m: predict(sizes, m, dtype, settings, n_tokens) for m in ("memory", "disk")}
    gpu = device != "cpu"
    if gpu:          # the device holds what the host holds on a CPU scan, less the file pages
        split = {m: on_device(p, m, sizes) for m, p in parts.items()}
        parts, dev_parts = ({m: hd[i] for m, hd in split.items()} for i in (0, 1))
    host_need = {m: peak_of(p) for m, p in parts.items()}
    need = {m: peak_of(p) for m, p in dev_parts.items()} if gpu else host_need
    free = device_available if gpu else host_free
    if weights == "disk" and not disk_ok:
        raise MemoryPlanError("--weights disk reads the blocks from local safetensors files: "
                              "pass a save_pretrained folder (safe_serialization=True)")
    mode, why = choose_mode(weights, need, free, disk_ok, f" on {device}" if gpu else "")
    read = 3 * sum(sizes.blocks) * BYTES[str(dtype)] if mode == "disk" else 0
    if mode == "disk" and sizes.disk_bytes and sizes.n_params:
        read = int(3 * sizes.disk_bytes * sum(sizes.blocks) / sizes.n_params)
    result = MemoryPlan(mode, why, parts[mode], baseline, host_free, read, device,
                        dev_parts[mode] if gpu else None, device_available if gpu else None)
    if gpu:
        check_fits(result, need, disk_ok, f"{device}'s")
    check_fits(result, host_need, disk_ok)
    return result


def choose_mode(weights: str, need: dict, free: int | None, disk_ok: bool, where: str) -> tuple:
    """``(mode, why)``: ``auto`` keeps the whole model when its peak fits in ``free`` with
    :data:`HEADROOM` to spare, else reads each block from disk for its turn."""
    if weights != "auto":
        return weights, f"asked for (--weights {weights})"
    if free is None:
        return "memory", f"the free memory{where} is unknown: the whole model is loaded"
    room = f"{gb(free)} available{where}"
    if need["memory"] <= HEADROOM * free:
        return "memory", f"the whole model in memory ({gb(need['memory'])}) fits in {room}"
    if disk_ok:
        return "disk", (f"the whole model ({gb(need['memory'])}) does not fit in {room} "
                        f"(with {1 - HEADROOM:.0%} to spare): each block is read from disk "
                        "for its turn")
    return "memory", (f"the whole model ({gb(need['memory'])}) exceeds {room}, and the weights "
                      "are not local safetensors files that could be read per block")


def check_fits(p: MemoryPlan, need: dict, disk_ok: bool, where: str = "host"):
    """One line when the chosen mode cannot fit in the free memory of ``where`` (``host``,
    or the GPU of a GPU scan), before any work; ``need``: each mode's peak there."""
    gpu = where != "host"
    peak, free = ((p.device_peak_bytes, p.device_available_bytes) if gpu else
                  (p.predicted_bytes, p.available_bytes))
    if free is None or peak <= free:
        return
    parts = p.device_parts if gpu else p.parts
    bigger = "use a GPU with more memory or --device cpu" if gpu else "use a bigger machine"
    if p.mode == "memory" and disk_ok and need["disk"] <= free:
        hint = f"scan with --weights disk (predicted {gb(need['disk'])})"
    elif p.mode == "memory":
        hint = ("save the model as safetensors (save_pretrained) so that --weights disk can "
                f"read one block at a time (predicted {gb(need['disk'])}), or {bigger}")
    else:
        hint = (f"{'' if gpu else 'free memory or '}{bigger}: this is already one block at a "
                f"time (the block being worked on: {gb(parts['block'])}, embedding, norm and "
                f"head: {gb(parts['weights'])})")
    raise MemoryPlanError(f"the scan needs about {gb(peak)} of {where} memory in {p.mode} mode "
                          f"but only {gb(free)} is free: {hint}")
