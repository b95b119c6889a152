"""x_t dropout: fine-tunes replace some noised masks by pure noise; 0 leaves every seeded draw as it was."""
from __future__ import annotations

import pytest
import torch

from medconddiff.checkpoint import load_checkpoint
from medconddiff.config import TrainConfig
from medconddiff.errors import ConfigError
from medconddiff.families import build_model
from medconddiff.finetune import FINETUNE_DEFAULTS, finetune_config
from medconddiff.schedulers import NoiseSchedule
from medconddiff.xt_dropout import drop_noised_state
from tests.conftest import tiny_config


def test_zero_fraction_returns_the_input_and_draws_nothing():
    x_t = torch.randn(4, 2, 8, 8)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert drop_noised_state(x_t, 0.0, generator) is x_t
    assert torch.equal(generator.get_state(), state)


def test_dropped_items_are_fresh_noise_and_the_rest_untouched():
    x_t = torch.full((64, 2, 8, 8), 7.0)          # far from N(0, 1): a replaced item is easy to see
    out = drop_noised_state(x_t, 0.5, torch.Generator().manual_seed(0))
    replaced = (out != 7.0).flatten(1).all(dim=1)
    kept = (out == 7.0).flatten(1).all(dim=1)
    assert torch.equal(replaced, ~kept)
    assert 16 < int(replaced.sum()) < 48
    assert out[replaced].abs().max() < 7.0 and abs(float(out[replaced].std()) - 1.0) < 0.1
    again = drop_noised_state(x_t, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("family", ["pixel", "latent"])
def test_training_loss_keeps_its_seeds_without_dropout_and_changes_with_it(family, one_torch_thread):
    config = tiny_config(family)
    torch.manual_seed(0)
    model = build_model(config.model)
    if family == "latent":
        model.latent_scale.fill_(1.0)
        model.latent_bound.fill_(3.0)           # as if prepare_training had fitted the VAE
        model.freeze_vae()
    model.eval()                                # no dropout/BN noise: the loss depends on the draws only
    schedule = NoiseSchedule(config.diffusion)
    image = torch.randn(4, 1, 64, 64)
    labels = torch.randint(0, 3, (4, 64, 64))

    def loss(**kwargs):
        with torch.no_grad():
            return model.training_loss(image, labels, schedule, torch.Generator().manual_seed(1), **kwargs)["loss"].item()

    assert loss() == loss(xt_dropout=0.0)
    assert loss(xt_dropout=0.9) != loss()


def test_the_setting_is_validated_and_fine_tunes_use_it(tiny_checkpoint):
    with pytest.raises(ConfigError, match="xt_dropout"):
        TrainConfig(xt_dropout=1.0)
    with pytest.raises(ConfigError, match="xt_dropout"):
        TrainConfig(xt_dropout=-0.1)
    assert TrainConfig().xt_dropout == 0.0
    config = finetune_config(load_checkpoint(tiny_checkpoint), steps=5, log=lambda *_: None)
    assert config.train.xt_dropout == FINETUNE_DEFAULTS["xt_dropout"] == 0.8
