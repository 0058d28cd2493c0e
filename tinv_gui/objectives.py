"""What a diffusion model is trained to predict from noised latents: the training objective.

Each model family answers `objective()` with one of these (tinv_gui.families). Today: the noise
schedule of SD 1.x/2.x and SDXL (epsilon, v or sample prediction); flow matching (SD 3, Flux)
would be another class with the same three members.
"""

from __future__ import annotations

import torch

from .schema import SettingsError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    """The pipeline's training noise schedule (read through diffusers' DDPMScheduler, as its
    training examples do), as square-root tables on the device, computed once."""

    def __init__(self, scheduler_config, device: torch.device):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise SettingsError("model", f"its scheduler predicts {self.prediction_type!r}; only {', '.join(PREDICTION_TYPES)} can be trained")
        self.num_timesteps = scheduler.config.num_train_timesteps
        alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
        self.signal = alphas_cumprod.sqrt()
        self.noise = (1.0 - alphas_cumprod).sqrt()

    def sample_timesteps(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training timesteps drawn uniformly from the whole schedule."""
        return torch.randint(0, self.num_timesteps, (count,), generator=generator, device=device)

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The noised latents at `timesteps`, and what the UNet should predict from them."""
        signal = self.signal[timesteps].view(-1, 1, 1, 1)
        noise_scale = self.noise[timesteps].view(-1, 1, 1, 1)
        noisy = signal * latents + noise_scale * noise
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, signal * noise - noise_scale * latents
        return noisy, latents
