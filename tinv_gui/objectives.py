"""What a diffusion model is trained to predict from noised latents: the training objective.

Each model family answers `objective()` with an `Objective`. Today: the noise schedule of SD
1.x/2.x and SDXL (epsilon, v or sample prediction), or flow matching (SD 3.x, Flux.1: velocity
along the straight path from the data to the noise), with its own timesteps, targets and
per-sample loss weights.

Two options of the objective, as kohya sd-scripts, OneTrainer and invoke-training offer them:
noise offset (`sample_noise`, any objective) and min-SNR loss weighting (`loss_weights`, the
noise-prediction objective only). The loss itself, with each sample's weight and each latent
pixel's (masks), is `weighted_mse`.
"""

from __future__ import annotations

import torch

from .schema import SettingsError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Objective:
    """What every training objective answers: `num_timesteps`, `prediction_type`,
    `sample_timesteps`, `noisy_and_target` (subclasses), the noise (`sample_noise`) and each
    sample's weight in the loss (`loss_weights`)."""

    num_timesteps: int
    prediction_type: str
    takes_min_snr = False  # whether min-SNR weighting applies (noise- and v-prediction only)

    def sample_timesteps(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The noised latents at `timesteps`, and what the denoiser should predict from them."""
        raise NotImplementedError

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
        """Gaussian noise shaped like `latents`. With a noise `offset` (Guttenberg's, as kohya's
        --noise_offset and diffusers' examples add it), each sample's channels also get a random
        constant times `offset`, so the model can learn overall brightness, which plain noise hides."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if offset:
            noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device)
        return noise

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """Each sample's weight in the loss ([batch]): 1 unless the objective says otherwise."""
        return torch.ones(timesteps.shape, device=timesteps.device)


class NoiseSchedule(Objective):
    """The pipeline's training noise schedule (read through diffusers' DDPMScheduler, as its
    training examples do), as square-root tables on the device, computed once."""

    takes_min_snr = True

    def __init__(self, scheduler_config, device: torch.device):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise SettingsError("model", f"its scheduler predicts {self.prediction_type!r}; only {', '.join(PREDICTION_TYPES)} can be trained")
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.scheduler = scheduler  # its alphas_cumprod, for diffusers' compute_snr
        alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
        self.signal = alphas_cumprod.sqrt()
        self.noise = (1.0 - alphas_cumprod).sqrt()

    def sample_timesteps(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training timesteps drawn uniformly from the whole schedule."""
        return torch.randint(0, self.num_timesteps, (count,), generator=generator, device=device)

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """Each sample's weight in the loss: 1, or with min-SNR weighting (Hang et al., 2023; kohya's
        --min_snr_gamma, invoke-training's default 5) min(SNR, gamma) / SNR for epsilon prediction,
        min(SNR, gamma) / (SNR + 1) for v-prediction and min(SNR, gamma) for the clean sample, so the
        many easy low-noise timesteps stop outweighing the rest."""
        if not min_snr_gamma:
            return super().loss_weights(timesteps)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = snr.clamp(max=min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

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


class FlowMatching(Objective):
    """Rectified flow as SD 3.x and Flux.1 were trained, written as diffusers' train_dreambooth_sd3
    and train_dreambooth_flux scripts write it: sigma drawn with the scripts' density (logit-normal,
    mean 0, std 1), picked from the pipeline's FlowMatchEulerDiscreteScheduler table (which holds
    the config's `shift`, 3.0 for SD 3.x; Flux.1's resolution-dependent shift is applied at
    sampling time only, and the scripts train without it, as here); noisy latents
    (1 - sigma) * latents + sigma * noise; the target is the velocity noise - latents, as the Flux
    script and OneTrainer have it (the SD3 script's default --precondition_outputs 1 compares
    noisy - sigma * prediction with the latents instead: the same loss weighted by sigma²); the loss
    weighted per sample by `compute_loss_weighting_for_sd3` (all ones under logit-normal). Min-SNR
    weighting does not apply to it."""

    prediction_type = "flow"  # velocity

    def __init__(self, scheduler_config, device: torch.device, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.timesteps = scheduler.timesteps.to(device, torch.float32)  # num_timesteps * sigma, descending
        self.shift = float(scheduler.config.shift)  # what the table is shifted by (3.0 for SD 3.x), for the log
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

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """Each sample's weight: the scripts' `compute_loss_weighting_for_sd3` at its sigma (as the
        scripts weigh the squared error, then take each picture's mean and the batch's mean)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigma(timesteps)).float().view(-1)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, sample_weights: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error of a batch, each sample's weighted by `sample_weights` ([batch]).

    `pixel_weights` ([batch, 1, h, w], from masks) weigh each latent pixel: a sample's error is
    the weighted mean over its pixels, so a latent pixel of weight 0 does not count at all and a
    small masked subject trains as strongly as a whole picture would. Without pixel weights, or
    with all weights 1, this is plain `F.mse_loss`.
    """
    squared = (prediction.float() - target.float()).pow(2)
    if pixel_weights is None:
        per_sample = squared.mean(dim=(1, 2, 3))
    else:
        per_sample = (squared * pixel_weights).sum(dim=(1, 2, 3)) / (pixel_weights.sum(dim=(1, 2, 3)) * squared.shape[1]).clamp_min(1e-8)
    return (per_sample * sample_weights).mean()
