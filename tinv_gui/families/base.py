"""What every model family answers (see tinv_gui.families)."""

from __future__ import annotations

import functools
import inspect

import torch


class Family:
    """A family of diffusion models. Subclasses set the class attributes and override what differs."""

    name: str = ""  # short, for messages and metadata
    title: str = ""  # for people
    pipeline_class: str = ""  # the diffusers pipeline that loads it
    index_prefixes: tuple[str, ...] = ()  # model_index.json class names that belong to it ("" matches any)
    checkpoint_key_prefix: str | None = None  # a tensor name prefix only its single-file checkpoints have
    text_encoder_attributes: tuple[str, ...] = ("text_encoder",)  # the pipeline's attributes, in order
    tokenizer_attributes: tuple[str, ...] = ("tokenizer",)
    embedding_keys: tuple[str, ...] = ()  # an embedding file's key per text encoder; () : {token: tensor}
    # Whether its embedding files may hold only some text encoders' parts: OneTrainer writes a part
    # only for the text encoders it loaded (SD 3.x without T5: clip_l and clip_g), and the word is
    # left out of the prompt of an encoder without its part (as OneTrainer and ComfyUI do).
    partial_embeddings: bool = False
    default_clips: dict[int, str] = {}  # the CLIP each text encoder comes from, by its width
    demo_model: str = ""  # the offline demo model of this family
    t5_encoder: int | None = None  # which text encoder is T5 (SD 3.x, Flux.1): T5's tokenizer and config, no CLIP
    trainable: bool = True  # whether tinv-gui's methods handle it
    size_multiple: int = 8  # training pictures' sides are multiples of it (the VAE's scale, times a transformer's patch)

    # ------------------------------------------------------------------------- recognising it
    def matches_index(self, class_name: str) -> bool:
        return any(class_name.startswith(prefix) for prefix in self.index_prefixes)

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return self.checkpoint_key_prefix is None or any(k.startswith(self.checkpoint_key_prefix) for k in keys)

    # ------------------------------------------------------------------------- loading it
    @property
    def text_encoder_count(self) -> int:
        return len(self.text_encoder_attributes)

    def pipeline_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments of `from_pretrained` / `from_single_file`."""
        return dict(dtype=dtype)

    def prepare(self, pipe) -> None:
        """Anything the loaded pipeline needs before tinv-gui uses it."""

    def text_encoders(self, pipe) -> list:
        return [getattr(pipe, name) for name in self.text_encoder_attributes]

    def tokenizers(self, pipe) -> list:
        return [getattr(pipe, name) for name in self.tokenizer_attributes]

    def prompt_arguments(self, prefix: str = "") -> list[str]:
        """The pipeline's argument for each text encoder's prompt, in order: prompt, prompt_2,
        prompt_3 (with `prefix` "negative_", the negative prompts')."""
        return [f"{prefix}prompt" + (f"_{i + 1}" if i else "") for i in range(self.text_encoder_count)]

    usual_resolution: int = 512  # its models' usual native resolution, before one is loaded to tell (the Dataset tab's crops)

    def native_resolution(self, pipe) -> int:
        """The picture size the model was trained at."""
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    @functools.cached_property
    def default_guidance(self) -> float:
        """The guidance a picture is drawn with when the user chooses none: the family's pipeline's
        own default (its `__call__`'s guidance_scale), read from diffusers rather than copied, so
        generate, evaluate and the Playground draw as the pipeline does, and as the training
        previews (drawn without a guidance) do. For Flux.1 dev it is the value its guidance
        embedding was distilled for (schnell has no guidance embedding and ignores it)."""
        import diffusers

        call = getattr(diffusers, self.pipeline_class).__call__
        return float(inspect.signature(call).parameters["guidance_scale"].default)

    def trained_encoders(self, choice: str) -> tuple[bool, ...]:
        """Which text encoders' parts of a token train under the setting `train_encoders`: "all",
        "clip" (every encoder but T5) or "t5" (T5 alone); raises SettingsError when the choice
        leaves nothing to train."""
        from ..schema import SettingsError

        is_t5 = [i == self.t5_encoder for i in range(self.text_encoder_count)]
        if choice == "t5" and not any(is_t5):
            raise SettingsError("train_encoders", f"{self.title} has no T5 text encoder, only CLIP ones: choose 'all'")
        return tuple(choice == "all" or (t5 if choice == "t5" else not t5) for t5 in is_t5)

    def check_generation(self, negative: str | None, custom_sampler: bool) -> None:
        """Raise ValueError naming what this family cannot draw with (a negative prompt, a sampler
        other than the model's own)."""

    def vae_needs_upcast(self, vae) -> bool:
        """Whether its VAE must run in float32 where its weights are float16."""
        return False

    # ------------------------------------------------------------------------- conditioning
    def prompt_lengths(self, pipe) -> list[int]:
        """The length each tokenizer's prompts are padded to, as the pipeline pads them."""
        return [int(tokenizer.model_max_length) for tokenizer in self.tokenizers(pipe)]

    def encoder_output(self, index: int, text_encoder, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What text encoder number `index` contributes to the conditioning (a tuple of tensors,
        one row per prompt): computed once and kept for an encoder whose vectors do not train."""
        raise NotImplementedError

    def combine_outputs(self, outputs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning from every encoder's output: (hidden states, pooled embedding or None)."""
        raise NotImplementedError

    def encode_prompts(self, encoders: list, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text conditioning from (ids, attention mask) per text encoder, as the pipeline
        computes it: (hidden states, pooled embedding or None)."""
        return self.combine_outputs([self.encoder_output(i, te, ids, mask) for i, (te, (ids, mask)) in enumerate(zip(encoders, prompts))])

    def size_conditioning(self, images, size: int) -> torch.Tensor | None:
        """Per-picture extra ids the UNet takes in training (SDXL's sizes), or None."""
        return None

    def denoiser(self, pipe):
        """The network that denoises (a UNet here; a transformer in SD3 and Flux)."""
        return pipe.unet

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                pooled: torch.Tensor | None, size_ids: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's prediction for a training batch (latents in the VAE's layout; a family
        that packs latents, like Flux, packs and unpacks here)."""
        dtype = denoiser.dtype
        return denoiser(noisy.to(dtype), timesteps, hidden.to(dtype)).sample

    def recomputed_layers(self, denoiser) -> list:
        """The layers whose activations a step recomputes in its backward pass when full gradient
        checkpointing is off: the input projection and activation (GEGLU) of a UNet's feed-forward
        layers at the two highest latent resolutions, which keep the largest activations of a step
        (about 0.4 of 1.4 GB for SD 1.5 at 512 px). Their output projection is not recomputed: its
        weights are frozen, so its backward pass needs no activation, and recomputing it would
        cost a third of the feed-forward layer again (about 2% of a step) for no memory."""
        from diffusers.models.attention import FeedForward

        full_resolution = [denoiser.down_blocks[0], denoiser.down_blocks[1], denoiser.up_blocks[-1], denoiser.up_blocks[-2]]
        return [m.net[0] for block in full_resolution for m in block.modules() if isinstance(m, FeedForward)]

    def pipeline_conditioning(self, hidden: torch.Tensor, pooled: torch.Tensor | None, prefix: str = "") -> dict:
        """Encoded prompts as pipeline arguments: {prefix + "prompt_embeds": ..., ...}."""
        return {f"{prefix}prompt_embeds": hidden}

    @property
    def pooled_in_prompt_embeds(self) -> bool:
        """Whether a saved prompt_embeds file must hold pooled embeddings too."""
        return False

    def conditioning_width(self, text_widths: tuple[int, ...]) -> int:
        """The width of the hidden states the denoiser is conditioned on (a prompt_embeds file's):
        the text encoders' widths side by side (SDXL: both CLIPs')."""
        return sum(text_widths)

    # ------------------------------------------------------------------------- training objective
    def objective(self, scheduler_config, device: torch.device):
        """What the denoiser is trained to predict from noised latents: an objectives.Objective
        (`num_timesteps`, `prediction_type`, `sample_timesteps(count, generator, device)`,
        `noisy_and_target(latents, noise, timesteps)`, `loss_weights`): here the noise schedule
        (TransformerFamily: flow matching)."""
        from ..objectives import NoiseSchedule

        return NoiseSchedule(scheduler_config, device)


def has_tensor(keys: list[str], name: str) -> bool:
    """Whether a single-file checkpoint's tensor names hold `name`, bare or under the
    "model.diffusion_model." prefix its all-in-one files use."""
    return name in keys or f"model.diffusion_model.{name}" in keys
