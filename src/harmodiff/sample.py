"""Deterministic DDIM sampling with classifier-free guidance (CFG) and CFG++ (paper section 2.6).

The math is plain functions of the predicted noise and the cumulative alphas (a_t = alpha-bar_t):

    x0_hat = (x_t - sqrt(1 - a_t) eps_x0) / sqrt(a_t)
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_renoise              (DDIM, eta = 0)

Guidance decides the two noises from the unconditional and conditional predictions:

    none : eps_x0 = eps_renoise = eps_c
    cfg  : eps_x0 = eps_renoise = eps_u + w (eps_c - eps_u)            (Ho & Salimans 2022)
    cfgpp: eps_x0 = eps_u + lambda (eps_c - eps_u), eps_renoise = eps_u    (Chung et al. 2024)

CFG++ keeps the re-noising on the unconditional manifold; only the clean estimate is steered.
"""

from __future__ import annotations

from typing import Callable

import torch

from harmodiff.config import GUIDANCES, HarmonizeConfig



def linear_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """alpha-bar of MONAI's linear-beta schedule (the one the model was trained with)."""
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="linear_beta").alphas_cumprod.clone()


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending DDIM timesteps, evenly spaced from T - 1 to 0 (MONAI 1.6's `set_timesteps`).

    Starting at T - 1 means the first step sees (almost) pure noise, which is what sampling
    starts from. Each update goes to the next timestep of this list (MONAI's `step` instead
    subtracts T // steps, which drifts from its own list by a step or two).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{num_train_timesteps}, got {steps}")
    return [int(t) for t in torch.linspace(num_train_timesteps - 1, 0, steps).round().long()]


def eps_from_prediction(output, x_t, a_t, prediction: str = "eps"):
    """The noise implied by a network output, for each training target (a_t = alpha-bar_t):

        eps: output;  x0: (x_t - sqrt(a_t) x0) / sqrt(1 - a_t);  v: sqrt(a_t) v + sqrt(1 - a_t) x_t

    All three are linear in the output, so guiding the eps of the branches is the same as
    guiding their x0 or v."""
    if prediction == "eps":
        return output
    a_t = torch.as_tensor(a_t, dtype=x_t.dtype, device=x_t.device)
    if prediction == "x0":
        return (x_t - torch.sqrt(a_t) * output) / torch.sqrt(1 - a_t)
    if prediction == "v":
        return torch.sqrt(a_t) * output + torch.sqrt(1 - a_t) * x_t
    raise ValueError(f"prediction must be eps, v or x0, got {prediction!r}")


def guided_noise(eps_u, eps_c, guidance: str, scale: float):
    """(eps used for the clean estimate, eps used to re-noise) for a guidance mode."""
    if guidance == "none":
        return eps_c, eps_c
    if guidance == "cfg":
        eps = eps_u + scale * (eps_c - eps_u)
        return eps, eps
    if guidance == "cfgpp":
        return eps_u + scale * (eps_c - eps_u), eps_u
    raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")


def ddim_step(x_t, eps_x0, eps_renoise, a_t, a_prev):
    """One deterministic DDIM update from a_t to a_prev (a_prev = 1 gives the clean estimate)."""
    a_t = torch.as_tensor(a_t, dtype=x_t.dtype, device=x_t.device)
    a_prev = torch.as_tensor(a_prev, dtype=x_t.dtype, device=x_t.device)
    x0_hat = (x_t - torch.sqrt(1 - a_t) * eps_x0) / torch.sqrt(a_t)
    return torch.sqrt(a_prev) * x0_hat + torch.sqrt(1 - a_prev) * eps_renoise


EpsFn = Callable[[torch.Tensor, int], tuple[torch.Tensor | None, torch.Tensor]]


def sample_ddim(eps_fn: EpsFn, x_start, alphas_cumprod, timesteps, *, guidance: str = HarmonizeConfig.guidance,
                scale: float = HarmonizeConfig.scale, progress=None):
    """Run DDIM from `x_start` at timesteps[0] down to a clean sample.

    `eps_fn(x_t, t)` returns (eps_u, eps_c); eps_u may be None when guidance is 'none'. The final
    step goes to alpha-bar = 1 (the clean estimate), as with `set_alpha_to_one`.
    """
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    x = x_start
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t = float(ac[t])
        a_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
        eps_u, eps_c = eps_fn(x, int(t))
        eps_x0, eps_renoise = guided_noise(eps_u, eps_c, guidance, scale)
        x = ddim_step(x, eps_x0, eps_renoise, a_t, a_prev)
        if progress is not None:
            progress(1)
    return x


def noised_start(x0, noise, alphas_cumprod, t: int):
    """q(x_t | x0) at a fixed noise: sqrt(a_t) x0 + sqrt(1 - a_t) noise (start-from-source)."""
    a_t = float(torch.as_tensor(alphas_cumprod, dtype=torch.float64)[t])
    return (a_t ** 0.5) * x0 + ((1 - a_t) ** 0.5) * noise


def steps_run(steps: int, strength: float) -> int:
    """How many of a `steps`-long DDIM schedule a start at `strength` runs: round(strength * steps), >= 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, int(round(strength * steps)))


def start_timesteps(timesteps: list[int], strength: float) -> list[int]:
    """The last steps_run(len, strength) DDIM timesteps (strength 1 = the full schedule)."""
    return timesteps[-steps_run(len(timesteps), strength):]
