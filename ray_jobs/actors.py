"""Ray actors: a full-model replica and a block-range stage.

Both are plain classes (``ray.remote`` is applied by the driver with the resources and
restart policy placement chose), so they can also be used in-process.  Every method is a
pure function of its arguments plus a cache: a restarted actor (``max_restarts``) that gets
a retried task (``max_task_retries``) recomputes whatever its cache lost.
"""
from __future__ import annotations

import os

import torch

from coupling.analysis.prompt import analyze_prompt
from coupling.settings.scan_settings import ScanSettings


def _node_id() -> str | None:
    """The Ray node this actor runs on (None in-process without Ray): the report's record of
    where each replica or stage ran."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def _threads(threads: int | None):
    if threads:
        torch.set_num_threads(int(threads))


class ReplicaWorker:
    """One full copy of a model; analyses whole shards with ``coupling.analyze_prompt``.

    Every ``run`` names its model (``spec``: ``source, revision, dtype, random_init,
    init_seed, trust_remote_code, settings, fail_fast``) and the worker loads it when it
    differs from the one held -- so one pool serves consecutive models, and a restarted
    worker reloads.
    """

    def __init__(self, threads: int | None = 1, use_gpu: bool = False):
        _threads(threads)
        self.use_gpu = use_gpu
        self.spec, self.lm = None, None

    def prepare(self, spec: dict) -> dict:
        """Load ``spec`` if needed; what the driver reports about this worker."""
        reused = self.spec == spec
        self._load(spec)
        return {"pid": os.getpid(), "node_id": _node_id(), "n_params": self.lm.info["n_params"],
                "device": str(self.lm.device), "reused": reused}

    def _load(self, spec: dict):
        if self.spec == spec:
            return
        from coupling.model.loading import load_model

        self.spec, self.lm = None, None            # free the previous copy first
        self.lm = load_model(spec["source"], revision=spec["revision"], dtype=spec["dtype"],
                             random_init=spec["random_init"], seed=spec["init_seed"],
                             trust_remote_code=spec["trust_remote_code"],
                             device_map=self._device_map(spec))
        self.spec = spec

    def _device_map(self, spec: dict):
        """The plan's Accelerate map (GPU indices are this actor's own GPUs, 0..g-1, as Ray
        sets CUDA_VISIBLE_DEVICES); ``auto`` on GPUs without one; none on a CPU (also when
        the GPUs are logical only, as in the fake-provider tests)."""
        if not self.use_gpu or not torch.cuda.is_available():
            return None
        return spec.get("device_map") or "auto"

    def run(self, spec: dict, shard) -> tuple[list, list]:
        """``(results, failures)``: ``PromptResult`` per prompt of ``shard`` that succeeded,
        in order, and a ``failure_record`` per prompt whose analysis raised -- the others go
        on, as in the local scan; with ``spec["fail_fast"]`` the first failure raises
        ``PromptFailed``."""
        from coupling.errors import first_line
        from coupling.scan import PromptFailed, failure_record

        self._load(spec)
        out, failures = [], []
        for pid, ids, meta in zip(shard.prompt_ids, shard.token_ids, shard.metas):
            try:
                out.append(analyze_prompt(self.lm, torch.tensor([ids]), spec["settings"], pid,
                                          meta))
            except Exception as e:   # noqa: BLE001 -- any failure of one prompt is isolated
                if spec.get("fail_fast"):
                    raise PromptFailed(f"prompt {pid} failed ({first_line(e)}); without "
                                       "fail_fast it is recorded in failures.json and the "
                                       "scan goes on") from None
                failures.append(failure_record(pid, e))
        return out, failures


class StageWorker:
    """Blocks ``[lo, hi)`` of a model (``ray_jobs.stage.StageModel``) in a pipeline.

    Per prompt ``key`` the driver calls ``forward`` -> ``decompose`` -> ``couple``; each also
    receives the stage input ``x_in`` so that a restarted actor can rebuild its cache.
    """

    def __init__(self, source: str, revision, config, lo: int, hi: int, dtype: str,
                 settings: ScanSettings, block_path=None, trust_remote_code: bool = False,
                 threads: int | None = 1, use_gpu: bool = False):
        from ray_jobs.stage import StageModel

        _threads(threads)
        self.settings = settings
        self.stage = StageModel(source, config, lo, hi, dtype,
                                device="cuda" if use_gpu else "cpu", block_path=block_path,
                                trust_remote_code=trust_remote_code, revision=revision)
        self.cache: dict = {}          # key -> {"rec": ForwardRecord, "kept": dense Jacobians}

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node_id": _node_id(), "n_params": self.stage.n_params,
                "bytes_read": self.stage.bytes_read, "blocks": [self.stage.lo, self.stage.hi]}

    def _fwd(self, key, x_in):
        entry = self.cache.setdefault(key, {})
        if "rec" not in entry:
            entry["x_out"], entry["rec"] = self.stage.forward(torch.as_tensor(x_in),
                                                              self.settings.last_block)
        return entry

    def forward(self, key, x_in):
        """Returns ``(x_out, states)``: the next stage's input (None on the last stage) and
        this stage's trajectory slice ``{l: X^l (n, d)}`` in the model dtype."""
        entry = self._fwd(key, x_in)
        x_out = None if self.stage.last else entry["x_out"].cpu()
        # states are float32 casts of model-dtype tensors: shipping them in the model dtype
        # is exact and halves the bytes of bf16/fp16 models
        return x_out, {l: x.to(self.stage.dtype).cpu() for l, x in entry["rec"].states().items()}

    def decompose(self, key, x_in) -> dict:
        """``{t: {l: (U, S, V)}}`` of the owned layers (the only thing other stages need)."""
        entry = self._fwd(key, x_in)
        entry["kept"], factors = self.stage.decompose(entry["rec"], self.settings)
        return factors

    def couple(self, key, x_in, n_stages: int, *parts) -> dict:
        """This stage's parts of the prompt's result (``coupling.analysis.steps``): its rows of
        the coupling grids, the regularity (last stage), the token grids (the stage owning
        both token layers).  ``parts``: every stage's factors, then (last stage only) every
        stage's trajectory slice.  Frees the prompt's cache."""
        from ray_jobs.stage import trajectory_of

        try:
            entry = self._fwd(key, x_in)
            factors = list(parts[:n_stages])
            out = {"rows": None, "regularity": None, "tokens": None}
            s = self.settings
            if "depth" in s.measures:
                out["rows"] = self.stage.couple(entry["rec"], entry.get("kept"), factors, s)
            if "regularity" in s.measures and self.stage.last:
                out["regularity"] = self.stage.regularity(trajectory_of(parts[n_stages:]), s)
            if "tokens" in s.measures and self.owns_token_layers():
                out["tokens"] = self.stage.tokens(entry["rec"], s)
            return out
        finally:
            self.cache.pop(key, None)       # a failed prompt's cache is freed too

    def owns_token_layers(self) -> bool:
        from coupling.analysis.steps import token_layers

        l, lp = token_layers(self.settings, self.stage.n_layers)
        return l in self.stage.layers and lp in self.stage.layers
