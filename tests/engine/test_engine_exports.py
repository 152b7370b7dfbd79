"""Weights for download over the protocol: save_weights_external, signed URLs, age encryption, TTLs, with the
real SDK and the cookbook's `weights.download` against the engine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pyrage
import pytest
import tinker
from safetensors.torch import load_file
from tinker import types


def _trained(service, tiny_model: str) -> tinker.TrainingClient:
    training = service.create_lora_training_client(base_model=tiny_model, rank=4).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": [1.0] * 4},
    )
    training.forward_backward([datum], loss_fn="cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return training


def test_an_export_downloads_as_tinker_names_it_and_the_urls_are_signed(
    service, tiny_model, engine, tmp_path
):
    from tinker_cookbook import weights

    training = _trained(service, tiny_model)
    path = training.save_weights_external("plain").result().path
    assert path.endswith("/external_weights/plain")
    out = weights.download(tinker_path=path, output_dir=str(tmp_path / "plain"), base_url=engine.url)
    tensors = load_file(Path(out) / "adapter_model.safetensors")
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32
    # The unembedding under Tinker's name, everything else under peft's: what the cookbook's converters expect.
    assert any(k.startswith("base_model.model.model.unembed_tokens.lora_A") for k in tensors)
    assert any(".self_attn.q_proj.lora_B" in k for k in tensors)
    assert not any("lm_head" in k for k in tensors)

    rest = tinker.RestClient(base_url=engine.url, api_key="tml-local-test")
    urls = rest.get_external_weights_urls(path).result()
    url = urls.urls["adapter_config.json"]
    assert json.loads(urllib.request.urlopen(url).read())["r"] == 4
    for bad in (url.replace("signature=", "signature=0"), url.replace("expires=", "expires=1")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad)
        assert refused.value.code == 403
    # An export is for download; as weights to train or sample from, it is refused by name.
    with pytest.raises(Exception, match="is an export for download"):
        service.create_training_client_from_state(path).result()
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external" and listed[path].expires_at is not None
    rest.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url)


def test_an_encrypted_export_is_readable_only_with_the_key(service, tiny_model, engine, tmp_path):
    training = _trained(service, tiny_model)
    identity = pyrage.x25519.Identity.generate()
    path = (
        training.save_weights_external("sealed", age_encryption_recipients=[str(identity.to_public())])
        .result()
        .path
    )
    rest = tinker.RestClient(base_url=engine.url, api_key="tml-local-test")
    urls = rest.get_external_weights_urls(path).result().urls
    assert sorted(urls) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    sealed = urllib.request.urlopen(urls["adapter_config.json.age"]).read()
    assert b'"lora_alpha"' not in sealed
    assert json.loads(pyrage.decrypt(sealed, [identity]))["r"] == 4
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(sealed, [pyrage.x25519.Identity.generate()])
    with pytest.raises(Exception, match="not an age or SSH public key"):
        training.save_weights_external("bad", age_encryption_recipients=["age1nonsense"]).result()


def test_downloading_a_training_checkpoint_leaves_nothing_in_the_checkpoint_store(
    services, tiny_model, engine, engine_dirs, tmp_path
):
    """The cookbook's `weights.download` of a `weights/` checkpoint loads it into a run of its own, exports, and
    deletes the export: once its session is closed, that run's folder is gone too."""
    from tinker_cookbook import weights

    training = _trained(services(base_url=engine.url, api_key="tml-local-test"), tiny_model)
    state = training.save_state("to-download").result().path
    store = engine_dirs / "checkpoints"
    before = sorted(p.name for p in store.iterdir())
    out = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"), base_url=engine.url)
    assert json.loads((Path(out) / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in store.iterdir()) == before
    assert (store / training.model_id / "weights" / "to-download" / "meta.json").exists()
