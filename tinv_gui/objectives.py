"""What a diffusion model is trained to predict from noised latents: the training objective.

Each model family answers `objective()` with one of these (tinv_gui.families): the noise
schedule of SD 1.x/2.x and SDXL (epsilon, v or sample prediction), or flow matching (SD 3.x,
Flux.1: velocity along the straight path from the data to the noise). Both have the same members:
`num_timesteps`, `prediction_type`, `sample_timesteps`, `noisy_and_target` and `loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the mean squared error."""
        return F.mse_loss(prediction.float(), target.float())


class FlowMatching:
    """Rectified flow as SD 3.x and Flux.1 were trained, written as diffusers' train_dreambooth_sd3
    and train_dreambooth_flux scripts write it: sigma drawn with the scripts' density (logit-normal,
    mean 0, std 1), picked from the pipeline's FlowMatchEulerDiscreteScheduler table (which holds
    the config's `shift`, 3.0 for SD 3.x; Flux.1's resolution-dependent shift is applied at
    sampling time only, and the scripts train without it, as here); noisy latents
    (1 - sigma) * latents + sigma * noise; the target is the velocity noise - latents; the loss
    weighted by `compute_loss_weighting_for_sd3` (all ones under logit-normal)."""

    prediction_type = "flow"  # velocity

    def __init__(self, scheduler_config, device: torch.device, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.timesteps = scheduler.timesteps.to(device, torch.float32)  # num_timesteps * sigma, descending
        self.sigmas = scheduler.sigmas[: self.num_timesteps].to(device, torch.float32)
        self.shift = float(scheduler.config.shift)
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = weighting_scheme, logit_mean, logit_std, mode_scale

    def sample_timesteps(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Timesteps (num_timesteps * sigma, floats) at the scripts' density over the scheduler's table."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, count, self.logit_mean, self.logit_std, self.mode_scale, device=device, generator=generator
        )
        indices = (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        return self.timesteps[indices.to(self.timesteps.device)].to(device)

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma of each timestep, shaped to multiply latents [b, c, h, w]."""
        return (timesteps.float() / self.num_timesteps).view(-1, 1, 1, 1)

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The point at sigma on the straight path from the latents to the noise, and the velocity."""
        sigma = self.sigma(timesteps)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The scripts' loss: per picture the mean of the weighted squared error, then the batch mean."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigma(timesteps)).float()
        error = weighting * (prediction.float() - target.float()) ** 2
        return error.reshape(target.shape[0], -1).mean(1).mean()
