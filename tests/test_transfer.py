"""Starting a model from another checkpoint across class lists: what is kept, what starts fresh."""

from __future__ import annotations

import dataclasses

import torch

from medconddiff.checkpoint import load_checkpoint, save_checkpoint
from medconddiff.families import build_model
from medconddiff.transfer import transfer_weights
from tests.conftest import save_tiny, tiny_config

CLASS_LAYERS = ["denoiser.head.2.bias", "denoiser.head.2.weight", "denoiser.stem.weight"]


def fresh_model(config, seed=1):
    torch.manual_seed(seed)
    return build_model(config.model, in_channels=config.plan.input_channels)


def with_classes(config, names):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, class_names=names))


def test_any_change_of_the_class_list_restarts_the_class_layers_and_keeps_the_body(tmp_path):
    """Other names with as many classes (grey/white matter for liver/tumour) restart the class layers
    as a change of count does: an old class's weights would otherwise stand in for a new one."""
    start = load_checkpoint(save_tiny(tmp_path / "start.safetensors"))
    for names in (("background", "grey matter", "white matter"), ("background", "lesion")):
        model = fresh_model(with_classes(start.config, names))
        untrained = {k: v.clone() for k, v in model.state_dict().items()}
        lines = []
        assert sorted(transfer_weights(model, start, log=lines.append)) == CLASS_LAYERS
        state = model.state_dict()
        for key in CLASS_LAYERS:
            torch.testing.assert_close(state[key], untrained[key])          # fresh
        for key in ("denoiser.stem.bias", "denoiser.fine_mix.weight", "denoiser.head.0.weight"):
            torch.testing.assert_close(state[key], start.state_dict[key].float())   # class-free: copied
        assert lines[-1] == f"  re-initialised for the new class list {list(names)}: denoiser.head.2, denoiser.stem"
    same = fresh_model(start.config)
    assert transfer_weights(same, start, log=lambda line: None) == []
    torch.testing.assert_close(same.state_dict()["denoiser.stem.weight"], start.state_dict["denoiser.stem.weight"].float())


def test_a_latent_model_on_a_new_class_list_gets_a_new_mask_vae(tmp_path):
    """LSegDiff's VAE encodes K-class masks as a whole: on a new class list it starts fresh and is marked
    untrained, so training fits it again, instead of being half copied and kept frozen."""
    config = tiny_config("latent")
    model = fresh_model(config, seed=0)
    model.latent_bound.fill_(2.5)
    model.latent_scale.fill_(1.5)                               # a start model whose VAE was trained
    start = load_checkpoint(save_checkpoint(tmp_path / "latent.safetensors", model, config))
    same = fresh_model(config)
    transfer_weights(same, start, log=lambda line: None)
    assert same.vae_trained                                    # same classes: the trained VAE is kept
    other = fresh_model(with_classes(config, ("background", "lesion")))
    lines = []
    reinitialised = transfer_weights(other, start, log=lines.append)
    assert not other.vae_trained and "latent_bound" in reinitialised
    assert all(k in reinitialised for k in other.state_dict() if k.startswith("vae."))
    assert lines[-1].startswith("  re-initialised for the new class list ['background', 'lesion']: ")
    assert "vae (" in lines[-1]
    torch.testing.assert_close(other.state_dict()["adapter.projections.0.0.weight"],
                               start.state_dict["adapter.projections.0.0.weight"].float())
