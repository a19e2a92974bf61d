import pytest
import torch

from harmodiff import sample as smp
from harmodiff.diffusion import NoiseSchedule

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


@pytest.fixture(scope="module")
def schedule64(schedule):
    """The same schedule in float64, for checks at 1e-10."""
    return NoiseSchedule(schedule.alphas_cumprod.double())


def test_exact_trajectory_for_a_point_mass(schedule64):
    # data = one point x*: the ideal eps(x_t) = (x_t - sqrt(a_t) x*) / sqrt(1 - a_t), and DDIM keeps
    # eps constant, so x_{t_k} = sqrt(a_k) x* + sqrt(1 - a_k) eps0 exactly and the end is x*.
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(2, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    eps0 = torch.randn(x_star.shape, generator=g, dtype=torch.float64)
    ts = schedule64.ddim_timesteps(20)
    a = schedule64.alphas_cumprod
    x = a[ts[0]].sqrt() * x_star + (1 - a[ts[0]]).sqrt() * eps0
    seen = []

    def eps_fn(x_t, t):
        seen.append((t, x_t.clone()))
        return None, (x_t - a[t].sqrt() * x_star) / (1 - a[t]).sqrt()

    out = smp.sample_ddim(eps_fn, x, schedule64, ts, guidance="none", scale=1.0)
    for t, x_t in seen:
        torch.testing.assert_close(x_t, a[t].sqrt() * x_star + (1 - a[t]).sqrt() * eps0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, x_star, rtol=1e-10, atol=1e-10)


def _eps_pair(x, t):
    eps_u = torch.sin(3 * x) * (t + 1) / T
    eps_c = torch.cos(2 * x) * 0.7 + 0.1
    return eps_u, eps_c


def test_unguided_sampler_is_the_ddim_recursion(schedule64):
    # an independent loop over the DDIM update written from the formula (Song et al. 2020, eta 0)
    x0 = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = schedule64.ddim_timesteps(25)
    a = schedule64.alphas_cumprod
    x = x0.clone()
    for k, t in enumerate(ts):
        a_prev = a[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = _eps_pair(x, t)[1]
        pred_x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
    ours = smp.sample_ddim(_eps_pair, x0.clone(), schedule64, ts, guidance="none", scale=1.0)
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


def test_cfgpp_lambda_zero_is_unconditional_ddim(schedule):
    x0 = torch.randn(1, 1, 5, 5, 5, generator=torch.Generator().manual_seed(2))
    ts = schedule.ddim_timesteps(10)
    a = smp.sample_ddim(_eps_pair, x0, schedule, ts, guidance="cfgpp", scale=0.0)
    b = smp.sample_ddim(lambda x, t: (None, _eps_pair(x, t)[0]), x0, schedule, ts, guidance="none", scale=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cfg_w_one_is_conditional_ddim(schedule):
    x0 = torch.randn(1, 1, 5, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = schedule.ddim_timesteps(10)
    a = smp.sample_ddim(_eps_pair, x0, schedule, ts, guidance="cfg", scale=1.0)
    b = smp.sample_ddim(_eps_pair, x0, schedule, ts, guidance="none", scale=1.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cfgpp_renoises_with_the_unconditional_eps(schedule):
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    eps_u, eps_c = _eps_pair(x, 500)
    lam, a_t, a_prev = 0.6, schedule.alpha_bar(500), schedule.alpha_bar(480)
    got = smp.sample_ddim(lambda *_: (eps_u, eps_c), x, schedule, [500, 480], guidance="cfgpp", scale=lam)
    # by hand: the first step, then the second from there
    guided = eps_u + lam * (eps_c - eps_u)
    x0_hat = (x - (1 - a_t) ** 0.5 * guided) / a_t ** 0.5
    step1 = a_prev ** 0.5 * x0_hat + (1 - a_prev) ** 0.5 * eps_u
    wrong = a_prev ** 0.5 * x0_hat + (1 - a_prev) ** 0.5 * guided
    one = smp.sample_ddim(lambda *_: (eps_u, eps_c), x, schedule, [500], guidance="cfgpp", scale=lam)
    torch.testing.assert_close(schedule.ddim_step(x, guided, eps_u, 500, 480), step1)
    assert not torch.allclose(step1, wrong)
    # the two-step run's first update must be step1 (checked through its final value)
    x0_hat2 = (step1 - (1 - a_prev) ** 0.5 * guided) / a_prev ** 0.5
    torch.testing.assert_close(got, x0_hat2, rtol=1e-5, atol=1e-5)
    assert one.shape == x.shape
