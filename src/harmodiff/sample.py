"""Deterministic DDIM sampling with classifier-free guidance (CFG) and CFG++ (paper section 2.6).

The DDIM update and every other formula of the noise schedule are `harmodiff.diffusion.NoiseSchedule`'s;
it takes two noises, one for the clean estimate (eps_x0) and one to re-noise (eps_renoise). Guidance
decides them from the unconditional and conditional predictions:

    none : eps_x0 = eps_renoise = eps_c
    cfg  : eps_x0 = eps_renoise = eps_u + w (eps_c - eps_u)            (Ho & Salimans 2022)
    cfgpp: eps_x0 = eps_u + lambda (eps_c - eps_u), eps_renoise = eps_u    (Chung et al. 2024)

CFG++ keeps the re-noising on the unconditional manifold; only the clean estimate is steered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harmodiff.config import GUIDANCES
from harmodiff.diffusion import NoiseSchedule



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


EpsFn = Callable[[torch.Tensor, int], tuple[torch.Tensor | None, torch.Tensor]]


def sample_ddim(eps_fn: EpsFn, x_start, schedule: NoiseSchedule, timesteps, *, guidance: str,
                scale: float, progress=None):
    """Run DDIM from `x_start` at timesteps[0] down to a clean sample.

    `eps_fn(x_t, t)` returns (eps_u, eps_c); eps_u may be None when guidance is 'none'. The final
    step goes to alpha-bar = 1 (the clean estimate), as with `set_alpha_to_one`.
    """
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    x = x_start
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps_u, eps_c = eps_fn(x, int(t))
        eps_x0, eps_renoise = guided_noise(eps_u, eps_c, guidance, scale)
        x = schedule.ddim_step(x, eps_x0, eps_renoise, int(t), t_prev)
        if progress is not None:
            progress(1)
    return x
