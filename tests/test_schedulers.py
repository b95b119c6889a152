"""Schedulers and the progressive sampler: exactness against DDPM's posterior, determinism."""

import math

import pytest
import torch

from medconddiff.config import DiffusionConfig
from medconddiff.sampling import initial_noise, sample, sample_progressive
from medconddiff.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedule, make_scheduler


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule(DiffusionConfig(num_train_timesteps=50, schedule=request.param))


def test_schedules_are_valid(schedule):
    ab = schedule.alphas_cumprod
    assert torch.all(schedule.betas > 0) and torch.all(schedule.betas < 1)
    assert torch.all(ab[1:] < ab[:-1]), "ᾱ must decrease"
    assert ab[-1] < 0.05, "the last timestep must be close to pure noise"


def test_ddim_eta1_on_full_schedule_matches_ddpm_posterior(schedule):
    """DDIM with eta=1 over every training step is DDPM: same mean and same variance."""
    ddpm = DDPMScheduler(schedule, clip_range=None)
    ddim = DDIMScheduler(schedule, eta=1.0, clip_range=None)
    ddpm.set_timesteps(50)
    ddim.set_timesteps(50)
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8).double()
    x_t = torch.randn(2, 3, 8, 8).double()
    for t in ddpm.timesteps[:-1].tolist():
        mean, variance = ddpm.posterior(x0, t, x_t)
        stepped = ddim.step(x0, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        # The same generator state gives the noise DDIM added; removing it leaves DDIM's mean.
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)).double()
        assert math.isclose(ddim.sigma(t) ** 2, variance, rel_tol=1e-9, abs_tol=1e-15)
        torch.testing.assert_close(stepped - ddim.sigma(t) * noise, mean, rtol=1e-6, atol=1e-8)


def test_true_x0_model_makes_every_step_exact(schedule):
    """A denoiser that returns the true x_0 has x̂_0 exact at every step, and DDIM lands on x_0."""
    x0 = torch.rand(3, 2, 8, 8) * 2 - 1
    for name in ("ddim", "ddpm"):
        scheduler = make_scheduler(name, schedule, steps=7)
        x_t, generator = initial_noise(x0.shape, seed=3)
        steps = list(sample_progressive(lambda x, t, active: (x0[active], (x0[active] + 1) / 2), scheduler, x_t, generator))
        assert len(steps) == len(scheduler.timesteps)
        for step in steps:
            torch.testing.assert_close(step.probabilities, (x0 + 1) / 2)
        torch.testing.assert_close(steps[-1].sample, x0)


def test_ddim_eta0_is_deterministic_and_seeded():
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=100))

    def denoise(x, t, active):
        guess = torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 100.0)
        return guess, (guess + 1) / 2

    def run(seed, name="ddim", eta=0.0):
        scheduler = make_scheduler(name, schedule, steps=5, eta=eta)
        x_t, generator = initial_noise((2, 3, 4, 4), seed=seed)
        return sample(denoise, scheduler, x_t, generator)

    torch.testing.assert_close(run(0), run(0))
    torch.testing.assert_close(run(0, "ddpm"), run(0, "ddpm"))
    torch.testing.assert_close(run(0, "ddim", 1.0), run(0, "ddim", 1.0))
    assert not torch.allclose(run(0), run(1))
    assert run(0).shape == (5, 2, 3, 4, 4)


def test_set_timesteps_spans_the_schedule():
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=1000))
    scheduler = make_scheduler("ddim", schedule, steps=10)
    ts = scheduler.timesteps.tolist()
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError):
        make_scheduler("euler", schedule, steps=3)


def test_add_noise_matches_closed_form():
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=10))
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 9])
    out = schedule.add_noise(x0, noise, t)
    ab = schedule.alphas_cumprod[t].float()
    expected = ab.sqrt().view(-1, 1, 1, 1) + 2 * (1 - ab).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected.expand_as(out))


@pytest.mark.parametrize("num_train_timesteps", [2, 5, 10, 20])
def test_short_linear_schedules_stay_valid(num_train_timesteps):
    """The linear schedule's 1000/steps scaling pushes betas past 1 for short schedules; capped at
    0.999 (as the cosine schedule is), ᾱ stays a valid, strictly decreasing sequence in (0, 1]."""
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=num_train_timesteps, schedule="linear"))
    ab = schedule.alphas_cumprod
    assert torch.isfinite(ab).all() and torch.all(ab > 0) and torch.all(ab <= 1)
    assert torch.all(ab[1:] < ab[:-1]), "ᾱ must decrease"
    assert torch.all(schedule.betas > 0) and torch.all(schedule.betas <= 0.999)
    x0 = torch.rand(2, 2, 8, 8) * 2 - 1
    for name in ("ddim", "ddpm"):
        scheduler = make_scheduler(name, schedule, steps=num_train_timesteps, eta=0.5)
        x_t, generator = initial_noise(x0.shape, seed=0)
        steps = list(sample_progressive(lambda x, t, active: (x0[active], (x0[active] + 1) / 2), scheduler, x_t, generator))
        for step in steps:
            assert torch.isfinite(step.sample).all(), f"{name} step {step.index} is not finite"
        torch.testing.assert_close(steps[-1].sample, x0)


def test_linear_schedule_unchanged_where_betas_are_below_the_cap():
    """The cap only touches schedules short enough to need it: DDPM's 1000 steps keep their betas."""
    config = DiffusionConfig(num_train_timesteps=1000, schedule="linear")
    expected = torch.linspace(config.beta_start, config.beta_end, 1000, dtype=torch.float64)
    assert torch.equal(NoiseSchedule(config).betas, expected)


def _stepper(name):
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=50))
    if name == "ddpm":
        scheduler = DDPMScheduler(schedule)
    else:
        scheduler = DDIMScheduler(schedule, eta=0.5)
    scheduler.set_timesteps(5)
    return scheduler


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_per_sample_generators_make_a_slice_independent_of_its_batch(name):
    """With one generator per batch item, item b's trajectory is bit-identical to sampling it alone."""
    scheduler = _stepper(name)
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    x_batch = torch.randn(4, 3, 8, 8)
    x_alone = x_batch[2:3].clone()
    generators = [torch.Generator().manual_seed(10 + b) for b in range(4)]
    alone = torch.Generator().manual_seed(12)      # seeded like generators[2]
    alone_seq = [torch.Generator().manual_seed(12)]
    x_alone_seq = x_alone.clone()
    for t in scheduler.timesteps.tolist():
        x_batch = scheduler.step(x0, t, x_batch, generator=generators).prev_sample
        x_alone = scheduler.step(x0[2:3], t, x_alone, generator=alone).prev_sample
        x_alone_seq = scheduler.step(x0[2:3], t, x_alone_seq, generator=alone_seq).prev_sample
        assert torch.equal(x_batch[2:3], x_alone), f"item 2 differs from its solo run at t={t}"
        assert torch.equal(x_batch[2:3], x_alone_seq)
    # And the noise really is per item: no two items drew the same stream.
    noise = scheduler._noise_like(x_batch, [torch.Generator().manual_seed(10 + b) for b in range(4)])
    assert not torch.equal(noise[0], noise[1])


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_per_sample_generators_must_match_the_batch(name):
    scheduler = _stepper(name)
    x = torch.zeros(4, 3, 8, 8)
    t = scheduler.timesteps[0].item()
    with pytest.raises(ValueError, match="one generator per batch item.*4.*got 3"):
        scheduler.step(x, t, x, generator=[torch.Generator() for _ in range(3)])


def test_sampling_with_per_sample_generators_matches_solo_runs():
    """Through the sampler: each slice of a DDPM batch comes out as if it were sampled alone."""
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=100))

    def denoise(x, t, active):   # per item: a slice's output depends on that slice only
        guess = torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 100.0)
        return guess, (guess + 1) / 2

    scheduler = make_scheduler("ddpm", schedule, steps=5)
    x_t = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = sample(denoise, scheduler, x_t, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    for b, seed in enumerate((7, 8, 9)):
        alone = sample(denoise, scheduler, x_t[b:b + 1], torch.Generator().manual_seed(seed))
        assert torch.equal(batch[:, b:b + 1], alone)


def test_items_that_stop_early_leave_the_batch_and_the_others_are_unchanged():
    """Adaptive steps: once keep() drops an item, it costs nothing and the rest go on exactly as before."""
    schedule = NoiseSchedule(DiffusionConfig(num_train_timesteps=100))
    seen = []

    def denoise(x, t, active):
        seen.append(active.tolist())
        guess = torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 100.0)
        return guess, (guess + 1) / 2

    def keep(step):
        return step.active != 1 if step.index == 1 else None      # item 1 converges after step 2

    scheduler = make_scheduler("ddim", schedule, steps=5, eta=0.5)
    x_t = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    steps = list(sample_progressive(denoise, scheduler, x_t, generators, keep=keep))
    assert seen == [[0, 1, 2], [0, 1, 2], [0, 2], [0, 2], [0, 2]]
    assert [tuple(s.active.tolist()) for s in steps][-1] == (0, 2) and steps[-1].probabilities.shape[0] == 2
    full = sample(lambda x, t, a: denoise(x, t, a), scheduler, x_t, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    torch.testing.assert_close(steps[-1].probabilities, full[-1, [0, 2]], rtol=0, atol=0)
    assert list(sample_progressive(denoise, scheduler, x_t, None, keep=lambda step: torch.zeros(3, dtype=torch.bool)))[-1].index == 0
