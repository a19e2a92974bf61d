"""The noise schedule against MONAI's schedulers and against its formulas."""

import pytest
import torch

from harmodiff.diffusion import NoiseSchedule, steps_run

T = 1000


@pytest.fixture(scope="module")
def monai_ddpm():
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


def test_alphas_and_forward_noising_are_monais(schedule, monai_ddpm):
    assert torch.equal(schedule.alphas_cumprod, monai_ddpm.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 6, 6, 6, generator=g), torch.randn(4, 1, 6, 6, 6, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), monai_ddpm.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    # one timestep for a whole batch (the sampler's noised start) is the batch form at that t
    a = float(monai_ddpm.alphas_cumprod[400])
    torch.testing.assert_close(schedule.add_noise(x0, noise, 400), a ** 0.5 * x0 + (1 - a) ** 0.5 * noise)
    assert schedule.alpha_bar(-1) == 1.0


def test_ddim_timesteps_are_monais_and_a_start_runs_the_last_ones(schedule):
    from monai.networks.schedulers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    s.set_timesteps(50)
    full = schedule.ddim_timesteps(50)
    assert full == [int(t) for t in s.timesteps] and full[0] == 999 and full[-1] == 0
    assert schedule.ddim_timesteps(50, 0.4) == full[-20:] and schedule.ddim_timesteps(10, 0.5) == \
        schedule.ddim_timesteps(10)[-5:]
    assert steps_run(50, 0.4) == 20 and steps_run(10, 0.01) == 1
    with pytest.raises(ValueError):
        schedule.ddim_timesteps(50, 0.0)
    with pytest.raises(ValueError):
        schedule.ddim_timesteps(T + 1)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_targets_invert_to_the_noise(schedule, monai_ddpm, prediction):
    """What the network is trained on (v checked against MONAI's get_velocity) maps back to the
    true noise through the sampler's conversion, at every noise level."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 6, 6, 6, generator=g), torch.randn(4, 1, 6, 6, 6, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    target = schedule.target(prediction, x0, noise, t)
    if prediction == "v":
        torch.testing.assert_close(target, monai_ddpm.get_velocity(x0, noise, t))
    x_t = schedule.add_noise(x0, noise, t)
    for i in range(4):
        eps = schedule.eps_from_output(target[i], x_t[i], int(t[i]), prediction)
        torch.testing.assert_close(eps, noise[i], atol=2e-3 if prediction == "x0" and i == 0 else 1e-4, rtol=0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        schedule.target("score", x0, noise, t)


def test_min_snr_weights_follow_the_formula():
    a = torch.tensor([0.999, 0.9, 0.5, 0.01])
    schedule = NoiseSchedule(a)
    t = torch.arange(4)
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.tensor(5.0))
    torch.testing.assert_close(schedule.loss_weight("eps", "min_snr", t, 5.0), clipped / snr)
    torch.testing.assert_close(schedule.loss_weight("v", "min_snr", t, 5.0), clipped / (snr + 1))
    torch.testing.assert_close(schedule.loss_weight("x0", "min_snr", t, 5.0), clipped)
    assert schedule.loss_weight("eps", "min_snr", t, 5.0)[-1] == pytest.approx(1.0)  # low SNR: unweighted eps
    assert torch.equal(schedule.loss_weight("x0", "none", t), torch.ones(4))


def test_ddim_step_is_the_formula(schedule):
    g = torch.Generator().manual_seed(1)
    x, e1, e2 = (torch.randn(2, 1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_prev = schedule.alpha_bar(600), schedule.alpha_bar(400)
    expected = a_prev ** 0.5 * (x - (1 - a_t) ** 0.5 * e1) / a_t ** 0.5 + (1 - a_prev) ** 0.5 * e2
    torch.testing.assert_close(schedule.ddim_step(x, e1, e2, 600, 400), expected, rtol=1e-12, atol=1e-12)
    # to t_prev = -1: the clean estimate itself
    torch.testing.assert_close(schedule.ddim_step(x, e1, e2, 600, -1), (x - (1 - a_t) ** 0.5 * e1) / a_t ** 0.5)
