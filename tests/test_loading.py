"""Model loading from save_pretrained folders: dtype, random init, tokenizer, errors."""
import pytest
import torch

from coupling.errors import ModelLoadError
from coupling.model.loading import load_model, parse_dtype
from coupling.model.zoo import save_random, small_config


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return save_random(small_config("llama", n_layers=2, d=32), folder, seed=3)


def test_folder_loads_with_weights_and_info(llama_folder):
    lm = load_model(llama_folder)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.config._attn_implementation == "eager"   # Jacobians need eager attention
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.info["n_layers"] == 2 and lm.info["d_model"] == 32 and lm.info["n_params"] > 0
    assert len(lm.info["weights_sha256"]) == 64 and lm.info["random_init"] is False
    ref = load_model(llama_folder)
    for a, b in zip(lm.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)


def test_dtype_and_random_init(llama_folder):
    bf = load_model(llama_folder, dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    trained = load_model(llama_folder)
    r1 = load_model(llama_folder, random_init=True, seed=11)
    r2 = load_model(llama_folder, random_init=True, seed=11)
    r3 = load_model(llama_folder, random_init=True, seed=12)
    w = lambda lm: lm.model.model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert torch.equal(w(r1), w(r2)) and not torch.equal(w(r1), w(r3))
    assert not torch.equal(w(r1), w(trained))
    assert r1.info["random_init"] and r1.info["seed"] == 11
    assert type(r1.model) is type(trained.model)


def test_embedded_tiny_model_has_tokenizer():
    lm = load_model()
    assert lm.info["id"] == "embedded:tiny" and lm.tokenizer is not None
    ids = lm.tokenizer("What is the capital of France? The capital is")["input_ids"]
    assert len(ids) > 3


def test_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")


def test_revision_with_a_local_folder_is_a_one_line_error(llama_folder, tmp_path, capsys):
    """transformers ignores a revision for a folder; we refuse it instead of writing a
    revision the weights do not come from into the manifest."""
    with pytest.raises(ModelLoadError, match=f"revision 'v2' was given with the local folder "
                                             f"{llama_folder}, which has no revisions"):
        load_model(llama_folder, revision="v2")
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model(None, revision="main")                 # the embedded tiny model is a folder
    from coupling.cli import main
    rc = main(["scan", "--model", str(llama_folder), "--revision", "v2",
               "--out", str(tmp_path / "o"), "--no-figures"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("coupling: error: revision 'v2' was given")
    assert not (tmp_path / "o").exists()
