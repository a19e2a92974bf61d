"""The noise schedule, one object for training and sampling (paper sections 2.4 and 2.6).

With a_t = alpha-bar_t of MONAI's linear-beta schedule (the one the model is trained with):

    forward (add_noise):   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    training target:       eps: eps;  x0: x0;  v: sqrt(a_t) eps - sqrt(1 - a_t) x0
    eps from an output:    eps: out;  x0: (x_t - sqrt(a_t) out) / sqrt(1 - a_t);  v: sqrt(a_t) out + sqrt(1 - a_t) x_t
    min-SNR-gamma weight:  SNR = a_t / (1 - a_t); eps: min(SNR, g) / SNR, v: min(SNR, g) / (SNR + 1), x0: min(SNR, g)
                           (Hang et al. 2023)
    DDIM step (eta = 0):   x0_hat = (x_t - sqrt(1 - a_t) eps_x0) / sqrt(a_t)
                           x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_renoise

The DDIM step takes two noises so that guidance (`harmodiff.sample`) can steer the clean estimate
and re-noise with another (CFG++). MONAI's `DDIMScheduler.step` is not used: it takes one noise,
and it goes to t - T // steps instead of the next timestep of its own list, which drifts from that
list by a step or two. The schedule itself (the betas, alpha-bar) is MONAI's.
"""

from __future__ import annotations

import torch

from harmodiff.config import PREDICTIONS


class NoiseSchedule:
    """alpha-bar_t for t = 0 .. T - 1 and every formula that reads it (see the module docstring)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self._double = self.alphas_cumprod.double()
        self._on_device = {}  # (device, float64?) -> alpha-bar there: a training step indexes it in place

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000) -> NoiseSchedule:
        """MONAI's linear-beta schedule (float32, as the scheduler builds it)."""
        from monai.networks.schedulers import DDPMScheduler

        return cls(DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                 schedule="linear_beta").alphas_cumprod.clone())

    def alpha_bar(self, t: int) -> float:
        """a_t as a float; t = -1 is the clean end (a = 1, as MONAI's `set_alpha_to_one`)."""
        return 1.0 if t < 0 else float(self._double[int(t)])

    def _alphas_on(self, device, double: bool = True) -> torch.Tensor:
        key = (str(device), double)
        if key not in self._on_device:
            self._on_device[key] = (self._double if double else self.alphas_cumprod).to(device)
        return self._on_device[key]

    def _coefficients(self, t, like: torch.Tensor):
        """(sqrt(a_t), sqrt(1 - a_t)) computed in float64, cast to `like`, shaped to broadcast over a batch
        (t a (B,) tensor, indexed on its own device) or over everything (t an int)."""
        if isinstance(t, torch.Tensor):
            a = self._alphas_on(t.device)[t]
        else:
            a = self._double[int(t)]
        shape = (-1,) + (1,) * (like.dim() - 1) if a.dim() else ()
        return (a.sqrt().to(like.device, like.dtype).view(shape),
                (1 - a).sqrt().to(like.device, like.dtype).view(shape))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x0) at a given noise; t is one timestep or one per batch element."""
        s, r = self._coefficients(t, x0)
        return s * x0 + r * noise

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network is trained to output."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        if prediction == "v":
            s, r = self._coefficients(t, x0)
            return s * noise - r * x0
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    def eps_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: int, prediction: str) -> torch.Tensor:
        """The noise implied by a network output at timestep t. All three are linear in the output, so
        guiding the eps of the two branches is the same as guiding their x0 or v."""
        if prediction == "eps":
            return output
        a = torch.as_tensor(self.alpha_bar(t), dtype=x_t.dtype, device=x_t.device)
        if prediction == "x0":
            return (x_t - torch.sqrt(a) * output) / torch.sqrt(1 - a)
        if prediction == "v":
            return torch.sqrt(a) * output + torch.sqrt(1 - a) * x_t
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    def loss_weight(self, prediction: str, weighting: str, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        """Per-sample loss weights: 1 (`none`) or min-SNR-gamma for the target (`min_snr`)."""
        a = self._alphas_on(t.device, double=False)[t]
        if weighting == "none":
            return torch.ones_like(a)
        snr = a / (1 - a)
        clipped = torch.clamp(snr, max=gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]

    def ddim_timesteps(self, steps: int, strength: float = 1.0) -> list[int]:
        """Descending DDIM timesteps evenly spaced from T - 1 to 0 (MONAI 1.6's `set_timesteps`), of which
        a start at `strength` runs the last `steps_run(steps, strength)`. Starting at T - 1 means the
        first step sees (almost) pure noise, which is what sampling from noise starts from."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"DDIM steps must be in 1..{T}, got {steps}")
        timesteps = [int(t) for t in torch.linspace(T - 1, 0, steps).round().long()]
        return timesteps[-steps_run(steps, strength):]

    def ddim_step(self, x_t: torch.Tensor, eps_x0: torch.Tensor, eps_renoise: torch.Tensor, t: int,
                  t_prev: int) -> torch.Tensor:
        """One deterministic DDIM update from timestep t to t_prev (-1: the clean estimate)."""
        a_t = torch.as_tensor(self.alpha_bar(t), dtype=x_t.dtype, device=x_t.device)
        a_prev = torch.as_tensor(self.alpha_bar(t_prev), dtype=x_t.dtype, device=x_t.device)
        x0_hat = (x_t - torch.sqrt(1 - a_t) * eps_x0) / torch.sqrt(a_t)
        return torch.sqrt(a_prev) * x0_hat + torch.sqrt(1 - a_prev) * eps_renoise


def steps_run(steps: int, strength: float) -> int:
    """How many of a `steps`-long DDIM schedule a start at `strength` runs: round(strength * steps), >= 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, int(round(strength * steps)))
