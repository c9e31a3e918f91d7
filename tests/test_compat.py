"""Stack compatibility: what the fast path needs from transformers, found the same way on
every version the project declares (scripts/compat.sh runs this file at both ends).

* The KV-cache argument of a block is found from its signature (``cache`` since transformers
  5.24, ``past_key_values``/``layer_past`` before), including a name no release has used yet.
* No supported causal family falls back from the one-token function; a real fall-back is
  reported per layer (manifest and summary line), never only as a warning.
* ``coupling --help`` and argument errors import neither torch, transformers nor ray.
"""
import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from transformers.cache_utils import Cache

from coupling.analysis.prompt import analyze_prompt, jacobian_function_report
from coupling.jacobian.fastpath import FastBlock
from coupling.model.blocks import CACHE_NAMES, CallRecorder, cache_parameter, find_blocks
from coupling.model.loading import LoadedModel
from coupling.model.trajectory import run_forward
from coupling.model.zoo import CAUSAL, build_random, random_inputs, small_config
from coupling.settings.scan_settings import ScanSettings

N = 6


def _loaded(family, n_layers=3):
    cfg = small_config(family, n_layers=n_layers)
    return LoadedModel(build_random(cfg), None, cfg, {"n_layers": n_layers, "d_model": 32})


@pytest.mark.parametrize("family", CAUSAL)
def test_cache_parameter_is_the_one_the_block_uses(family):
    """The name found is a real parameter of the block, and a cache passed under it is the
    one the block's attention updates (a wrong name would be swallowed by ``**kwargs``)."""
    lm = _loaded(family, n_layers=1)
    _, blocks = find_blocks(lm.model)
    name = cache_parameter(blocks[0])
    params = inspect.signature(blocks[0].forward).parameters
    assert name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    with CallRecorder(blocks) as rec:
        lm.model(**random_inputs(family, N), use_cache=False)
    fb = FastBlock(rec.calls[0])
    assert len(fb._prefix_kv()) >= 1, f"{family}: the block never updated the cache"


class _RenamedCacheBlock(nn.Module):
    """A real Llama block behind a signature whose cache argument has a name transformers has
    never used: what a future rename looks like."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, attention_mask=None, position_ids=None,
                kv_memory: Cache | None = None, position_embeddings=None, **kwargs):
        for name in CACHE_NAMES:        # what the model passes under the real name
            kwargs.pop(name, None)
        return self.inner(hidden_states, attention_mask=attention_mask,
                          position_ids=position_ids, position_embeddings=position_embeddings,
                          **{cache_parameter(self.inner): kv_memory}, **kwargs)


class _NoCacheBlock(_RenamedCacheBlock):
    """The same block dropping any cache it is given (as a block that recomputes its keys
    and values would): the one-token function cannot exist."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None,
                position_embeddings=None, **ignored):
        return self.inner(hidden_states, attention_mask=attention_mask,
                          position_ids=position_ids, position_embeddings=position_embeddings)


def _wrapped(wrapper):
    lm = _loaded("llama", n_layers=3)
    layers = lm.model.model.layers
    for i in range(len(layers)):
        if i == 1:      # only the middle block is wrapped
            layers[i] = wrapper(layers[i])
    return lm


def test_a_renamed_cache_argument_is_found_from_the_signature():
    lm = _wrapped(_RenamedCacheBlock)
    block = lm.model.model.layers[1]
    assert cache_parameter(block) == "kv_memory"
    rec = run_forward(lm, random_inputs("llama", N))
    fb = FastBlock(rec.calls[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # a fall-back warns: fail on it
        for t in (0, N // 2, N - 1):
            assert fb.function_used(t, t) == ("one-token", "")
            full = FastBlock(rec.calls[1]).full_function()
            from coupling.jacobian.block_jacobian import exact_jacobians
            ref = exact_jacobians(full, rec.calls[1].input.float(), t, [t])[0]
            assert torch.allclose(fb.jacobian(t, t), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", CAUSAL)
def test_no_supported_causal_family_falls_back(family):
    """Every layer of every supported causal family uses the one-token function, with no
    fall-back warning: a transformers release that breaks the fast path fails here."""
    lm = _loaded(family)
    settings = ScanSettings(k=4, measures=("depth",), token="all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = analyze_prompt(lm, random_inputs(family, N)["input_ids"], settings)
    fallbacks = [str(w.message) for w in caught if "not usable" in str(w.message)]
    assert not fallbacks, fallbacks
    assert res.jacobian_functions["depth"] == {str(l): ["one-token", ""] for l in (1, 2, 3)}
    report = jacobian_function_report([res], 3, N)
    assert report["line"] == "one-token on 3/3 layers"


def test_a_real_fall_back_is_named_with_its_reason_and_cost():
    lm = _wrapped(_NoCacheBlock)
    settings = ScanSettings(k=4, measures=("depth",))
    with pytest.warns(RuntimeWarning, match="not usable"):
        res = analyze_prompt(lm, random_inputs("llama", N)["input_ids"], settings)
    kinds = res.jacobian_functions["depth"]
    assert kinds["1"] == ["one-token", ""] and kinds["3"] == ["one-token", ""]
    assert kinds["2"][0] == "truncated" and "never used its cache" in kinds["2"][1]
    line = jacobian_function_report([res, res], 3, N)["line"]
    assert line.startswith("one-token on 2/3 layers; truncated prompt on layer 2; ~6x the "
                           "tokens per product (one-token function unusable:"), line


def test_help_and_argument_errors_import_nothing_heavy():
    code = ("import sys, coupling.cli as c\n"
            "try:\n    c.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    for argv in (["--help"], ["scan", "--k", "x"], ["report", "--bogus"], ["correlate", "--by", "x"],
                 ["perturb", "--levels", "a"], ["checkpoints"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                             timeout=60)
        assert "HEAVY []" in out.stdout, (argv, out.stdout[-500:], out.stderr[-500:])
