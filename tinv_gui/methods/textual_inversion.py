"""Textual inversion (Gal et al., 2022): learn a token's vectors through the frozen diffusion model.

Each step takes latents of training pictures, adds noise at random timesteps of the pipeline's
own training schedule, and asks the frozen UNet to predict the noise (or v, or the clean sample:
whatever the scheduler config says) from a prompt holding the token. Only the token's vectors move.

What keeps a step cheap:
- each picture and its mirror go through the VAE encoder once; a step draws from the cached
  latent distributions, so the encoder never runs in the loop;
- only the [n, dim] new vectors carry gradients and optimizer state (extended_vocabulary); the
  UNet, VAE and text encoder are the warm pipeline's own, frozen, never copied;
- prompts are tokenized, and the noise schedule's square-root tables computed, before the loop;
- mixed precision where the device computes it fast (device.choose_placement decides).

SDXL runs the same loop with what its own training feeds the UNet: both text encoders' vectors
for the token (side by side in one tensor, see embeddings.py), their penultimate hidden states
concatenated, the second encoder's pooled projection, and each picture's size conditioning
(original size, crop corner, target size).
"""

from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import ImageOps

from ..data import (
    TrainImage,
    describe_sizes,
    fill_template,
    picture_batches,
    training_prompts,
    validation_prompts,
)
from ..device import Placement, release_freed_memory
from ..embeddings import (
    encode_with_placeholder,
    extended_vocabularies_from,
    initial_vectors,
    read_metadata,
    split_columns,
    validate_token,
)
from ..events import Preview, Reporter
from ..families import family_of
from ..files import atomic_save_image
from ..formats import check_fits, read_embedding
from ..models import pipeline_text_widths, text_encoders, tokenizers
from ..objectives import weighted_mse
from ..schema import SettingsError
from ..training import (
    EmbeddingWriter,
    LoopSettings,
    load_optimizer_state,
    make_optimizer,
    optimize,
    optimizer_state_path,
)

if TYPE_CHECKING:  # settings import the method registry, which imports the methods
    from ..settings import TrainSettings


@dataclass
class LatentCache:
    """The VAE's latent distribution (mean and log-variance) of every picture, then of every
    mirrored picture, computed once; `sample` draws scaled latents from it. Pictures of different
    buckets have latents of different shapes; a batch draws from one shape. `masks` holds, in the
    same rows, how much of each latent pixel the picture's mask covers (0 to 1), or None when no
    picture has a mask."""

    moments: list[torch.Tensor]  # per picture (then per mirror): [2 * latent channels, h, w], float32
    pictures: int
    scaling_factor: float
    shift_factor: float
    masks: list[torch.Tensor] | None = None  # per row of moments: [1, h, w], float32

    @property
    def mirrored(self) -> bool:
        return len(self.moments) > self.pictures

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each picture's latent shape (its bucket)."""
        return [tuple(m.shape) for m in self.moments[: self.pictures]]

    def rows(self, picked: list[int], mirror: list[bool]) -> list[int]:
        return [i + self.pictures if m else i for i, m in zip(picked, mirror)]

    def sample(self, picked: list[int], mirror: list[bool], generator: torch.Generator) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(torch.stack([self.moments[row] for row in self.rows(picked, mirror)])).sample(generator)
        return (latents - self.shift_factor) * self.scaling_factor

    def pixel_weights(self, picked: list[int], mirror: list[bool], unmasked_weight: float) -> torch.Tensor | None:
        """Each latent pixel's weight in the loss: 1 on the subject, `unmasked_weight` outside
        it (in between where the mask is); None when every pixel weighs 1."""
        if self.masks is None or unmasked_weight == 1:
            return None
        return unmasked_weight + (1 - unmasked_weight) * torch.stack([self.masks[row] for row in self.rows(picked, mirror)])


def latent_masks(images: list[TrainImage], latent_sizes: list[tuple[int, int]], mirror: bool) -> list[torch.Tensor] | None:
    """Each picture's mask (then each mirrored one's) at its latents' (height, width): the share
    of each latent pixel's area the mask covers ([1, h, w]); a picture without a mask is covered
    whole. None when no picture has a mask."""
    if all(i.mask is None for i in images):
        return None
    masks = []
    for image, size in zip(images, latent_sizes):
        pixels = torch.ones(1, 1, image.image.height, image.image.width)
        if image.mask is not None:
            pixels = torch.frombuffer(bytearray(image.mask.tobytes()), dtype=torch.uint8).view(1, 1, image.mask.height, image.mask.width) / 255.0
        masks.append(F.interpolate(pixels, size=size, mode="area")[0])
    return masks + [m.flip(-1) for m in masks] if mirror else masks


@torch.no_grad()
def encode_latents(pipe, images: list[TrainImage], placement: Placement, mirror: bool) -> LatentCache:
    """Run the VAE encoder once per picture (and per mirrored picture), each at its own size."""
    pictures = [i.image for i in images]
    if mirror:
        pictures += [ImageOps.mirror(p) for p in pictures]
    vae = pipe.vae
    upcast = family_of(pipe).vae_needs_upcast(vae)
    if upcast:
        vae.to(torch.float32)
    moments = []
    try:
        for picture in pictures:  # one at a time: the encoder's activations at 512 px are large
            # fp32 pixels: autocast, or the VAE's own fp32 compute (device.store_in_bf16_between_calls), takes them from there
            pixels = pipe.image_processor.preprocess(picture).to(placement.device, torch.float32)
            with contextlib.nullcontext() if upcast else placement.autocast():
                moments.append(vae.encode(pixels).latent_dist.parameters.float()[0])
    finally:
        if upcast:
            vae.to(torch.float16)
    masks = latent_masks(images, [tuple(m.shape[-2:]) for m in moments], mirror)
    return LatentCache(
        moments, len(images), float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0),
        None if masks is None else [m.to(placement.device) for m in masks],
    )


@dataclass
class TokenParts:
    """A token's vectors [n, sum of the text encoders' widths] as two tensors: the encoders' parts
    that train, side by side in one leaf tensor (what the optimizer, the NaN guard and the saved
    optimizer state see), and the parts that keep their start values (setting train_encoders:
    SD 3.x's and Flux.1's CLIP parts only, or T5's only)."""

    widths: tuple[int, ...]
    trains: tuple[bool, ...]
    trained: torch.Tensor  # [n, sum of the trained widths], float32, requires grad
    fixed: torch.Tensor  # [n, sum of the other widths]

    @classmethod
    def of(cls, vectors: torch.Tensor, widths: tuple[int, ...], trains: tuple[bool, ...], device: torch.device) -> TokenParts:
        parts = split_columns(vectors.to(device, torch.float32), widths)
        trained = torch.cat([part for part, t in zip(parts, trains) if t], dim=1).clone().requires_grad_(True)
        fixed = torch.cat([part for part, t in zip(parts, trains) if not t] or [parts[0][:, :0]], dim=1).clone()
        return cls(tuple(widths), tuple(trains), trained, fixed)

    def sources(self) -> list[tuple[torch.Tensor, slice]]:
        """(tensor, columns) of each encoder's part, for extended_vocabularies_from."""
        sources, used = [], {True: 0, False: 0}
        for width, trains in zip(self.widths, self.trains):
            sources.append((self.trained if trains else self.fixed, slice(used[trains], used[trains] + width)))
            used[trains] += width
        return sources

    def full(self) -> torch.Tensor:
        """The whole token [n, sum of widths], every encoder's part in order (what is saved)."""
        return torch.cat([tensor.detach()[:, columns] for tensor, columns in self.sources()], dim=1)

    @contextlib.contextmanager
    def holding(self, full: torch.Tensor):
        """Within the block the parts hold the values of `full` (a whole token, e.g. the moving
        average, for a preview); their own are back afterwards."""
        own = self.trained.detach().clone(), self.fixed.clone()
        pieces = split_columns(full.to(self.trained.device), self.widths)
        with torch.no_grad():
            for tensor, wanted in ((self.trained, True), (self.fixed, False)):
                chosen = [piece for piece, t in zip(pieces, self.trains) if t == wanted]
                if chosen:
                    tensor.copy_(torch.cat(chosen, dim=1))
        try:
            yield
        finally:
            with torch.no_grad():
                self.trained.copy_(own[0])
                self.fixed.copy_(own[1])


class DiffusionLoss:
    """The denoising loss of one random batch, with everything per-run prepared once.

    With `per_picture` prompts (captions), picture i is always paired with prompt i; otherwise
    each sample takes a random prompt of the templates. `prompts` holds the encoded prompts once
    per tokenizer (SDXL has two, SD 3.x three); rows past `prompt_count` are not trained on (the
    preview's). The outputs of a text encoder whose part does not train (`trains`) are computed
    once here, so it no longer runs (T5-XXL: most of a step). Create it where the token's
    vectors are in the text encoders (extended_vocabularies). `size_ids` is the family's
    per-picture size conditioning (SDXL's), if any; `repeats` how many times each picture is
    drawn per epoch (default once). A batch holds pictures of one bucket (data.picture_batches).
    """

    def __init__(
        self,
        pipe,
        placement: Placement,
        latents: LatentCache,
        prompts: list[list[list[int]]],
        per_picture: bool,
        batch_size: int,
        mirror: bool,
        seed: int,
        size_ids: torch.Tensor | None = None,
        repeats: list[int] | None = None,
        trains: tuple[bool, ...] | None = None,
        prompt_count: int | None = None,
        *,
        unmasked_weight: float = 1.0,
        noise_offset: float = 0.0,
        min_snr_gamma: float = 0.0,
    ):
        self.family = family_of(pipe)
        self.denoiser = self.family.denoiser(pipe)
        self.text_encoders = self.family.text_encoders(pipe)
        self.placement = placement
        self.latents = latents
        self.schedule = self.family.objective(pipe.scheduler.config, placement.device)
        if min_snr_gamma and not self.schedule.takes_min_snr:
            raise SettingsError("min_snr_gamma", f"min-SNR weighting is for noise- and v-predicting models (SD 1.x, 2.x, SDXL); {self.family.title} "
                                f"predicts {self.schedule.prediction_type}, where it does not apply: leave it at 0")
        self.unmasked_weight = unmasked_weight
        self.noise_offset = noise_offset
        self.min_snr_gamma = min_snr_gamma
        self.prompts = [
            pad_prompts(tokenizer, encoded, placement.device, length)
            for tokenizer, encoded, length in zip(tokenizers(pipe), prompts, self.family.prompt_lengths(pipe))
        ]
        self.prompt_count = prompt_count or len(prompts[0])
        self.trains = trains or (True,) * len(self.text_encoders)
        self.fixed_outputs = [None if t else self._encode_once(i) for i, t in enumerate(self.trains)]
        self.size_ids = None if size_ids is None else size_ids.to(placement.device)
        self.per_picture = per_picture
        self.batch_size = batch_size
        self.mirror = mirror and latents.mirrored
        self.rng = random.Random(seed)
        self.generator = torch.Generator(placement.device).manual_seed(seed)
        self.batches = picture_batches(latents.shapes, repeats or [1] * latents.pictures, batch_size, self.rng)

    @torch.no_grad()
    def _encode_once(self, index: int, chunk: int = 8) -> tuple[torch.Tensor, ...]:
        ids, mask = self.prompts[index]
        with self.placement.autocast():
            pieces = [self.family.encoder_output(index, self.text_encoders[index], ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, len(ids), chunk)]
        return tuple(torch.cat(outputs) for outputs in zip(*pieces))

    def conditioning(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled) of the prompts in `rows`; gradients reach the trained parts."""
        outputs = [
            self.family.encoder_output(i, text_encoder, ids[rows], mask[rows]) if fixed is None else tuple(t[rows] for t in fixed)
            for i, (text_encoder, (ids, mask), fixed) in enumerate(zip(self.text_encoders, self.prompts, self.fixed_outputs))
        ]
        return self.family.combine_outputs(outputs)

    def __call__(self, _micro: int = 0) -> torch.Tensor:
        device = self.placement.device
        picked = next(self.batches)
        mirror = [self.mirror and self.rng.random() < 0.5 for _ in picked]
        latents = self.latents.sample(picked, mirror, self.generator)
        noise = self.schedule.sample_noise(latents, self.generator, self.noise_offset)
        timesteps = self.schedule.sample_timesteps(len(picked), self.generator, device)
        noisy, target = self.schedule.noisy_and_target(latents, noise, timesteps)
        rows = picked if self.per_picture else [self.rng.randrange(self.prompt_count) for _ in picked]
        with self.placement.autocast():
            hidden, pooled = self.conditioning(rows)
            # The family adds its own conditioning (SDXL: pooled and sizes; a mirrored centered crop has the same corner).
            size_ids = None if self.size_ids is None else self.size_ids[picked]
            prediction = self.family.predict(self.denoiser, noisy, timesteps, hidden, pooled, size_ids)
        weights = self.schedule.loss_weights(timesteps, self.min_snr_gamma)
        loss = weighted_mse(prediction, target, weights, self.latents.pixel_weights(picked, mirror, self.unmasked_weight))
        release_freed_memory()  # the forward pass's temporaries, before the backward pass's peak
        return loss


def pad_prompts(tokenizer, prompts: list[list[int]], device: torch.device, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to `length` (default the tokenizer's full length, 77 for CLIP) with its own
    padding token, as the pipeline conditions on them, and the attention mask of the real tokens."""
    length = length or tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([p + [pad] * (length - len(p)) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (length - len(p)) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def render_preview(
    pipe, placement: Placement, compute_loss: DiffusionLoss, row: int, negative_row: int | None, size: int, steps: int, seed: int, path: Path
) -> Path:
    """Generate one picture from prompt `row` of the loss's prompts (the preview's, with the new
    vectors spliced in) with a fixed seed, and save it as PNG. With `negative_row`, the negative
    prompt's conditioning is that row's too (needed when a text encoder is off the accelerator)."""
    family = compute_loss.family
    dtype = compute_loss.denoiser.dtype

    def as_pipeline_arguments(row: int, prefix: str = "") -> dict:
        embeds, pooled = compute_loss.conditioning([row])
        return family.pipeline_conditioning(embeds.to(dtype), None if pooled is None else pooled.to(dtype), prefix)

    with torch.no_grad(), placement.autocast():
        conditioning = as_pipeline_arguments(row)
        if negative_row is not None:
            conditioning.update(as_pipeline_arguments(negative_row, "negative_"))
        generator = torch.Generator(placement.device).manual_seed(seed)
        image = pipe(**conditioning, num_inference_steps=steps, height=size, width=size, generator=generator).images[0]
    return atomic_save_image(image, path)


@contextlib.contextmanager
def activation_recomputation(denoiser, partial_layers: list, everywhere: bool):
    """Within the block, the backward pass recomputes activations instead of keeping them.

    `everywhere`: diffusers' gradient checkpointing of the whole denoiser (least memory, a step
    about a third slower). Otherwise only `partial_layers` (the family's recomputed_layers: a
    UNet's full-resolution feed-forward layers, cheap to recompute). The shared pipeline is left
    as it was.
    """
    if everywhere:
        denoiser.enable_gradient_checkpointing()
        try:
            yield
        finally:
            denoiser.disable_gradient_checkpointing()
        return
    for layer in partial_layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in partial_layers:
            del layer.forward  # the class's own forward again


@contextlib.contextmanager
def freed_memory_released_between_blocks(denoiser, placement: Placement):
    """Within the block, on the CPU, what glibc keeps of freed activations goes back to the system
    after each of the denoiser's blocks (its ModuleLists: a UNet's down and up blocks, a
    transformer's blocks) and once the loss is computed. Without it, those freed pieces stay
    resident between living ones and add to the step's peak (SD 1.5 at 512 px: 5.94 GB against
    5.61 GB, at no measurable cost in time). The shared pipeline is left as it was."""
    if placement.device.type != "cpu":  # the accelerator's memory is torch's own
        yield
        return
    blocks = [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    hooks = [block.register_forward_hook(lambda *_: release_freed_memory()) for block in blocks]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class Resumed:
    """What an earlier run left: its file, vectors, steps (over all phases) and optimizer state."""

    path: Path
    vectors: torch.Tensor
    steps_done: int
    optimizer_state_file: Path


def read_resume(path: str, pipe) -> Resumed:
    """Read an embedding an earlier run saved for `pipe`'s model, to continue it."""
    try:
        embedding = read_embedding(path)
        check_fits(embedding, pipeline_text_widths(pipe), Path(path).name)
        steps = int(read_metadata(path).get("steps", 0))
    except (OSError, ValueError) as error:
        raise SettingsError("resume", f"{Path(path).name} is not an embedding saved by tinv-gui for this model ({error})") from None
    return Resumed(Path(path), embedding.joined(), steps, optimizer_state_path(path))


def train_diffusion(
    pipe,
    placement: Placement,
    images: list[TrainImage],
    settings: TrainSettings,
    reporter: Reporter,
    writer: EmbeddingWriter,
    vectors: torch.Tensor,
    phase: str = "ti",
    resumed: Resumed | None = None,
    phase_offset: int = 0,
) -> torch.Tensor:
    """Train `vectors` ([n, sum of the text encoders' widths], the token's starting point, one
    part per encoder side by side) with the diffusion loss for `settings.steps` steps; only the
    parts of the encoders `settings.train_encoders` names move. `phase_offset` counts the steps of
    earlier phases of the same job. Saves through `writer` (with the optimizer state, for
    --resume) and returns the vectors."""
    token = validate_token(settings.token, pipe.tokenizer)
    family = family_of(pipe)
    size = settings.resolution or family.native_resolution(pipe)
    if size % family.size_multiple:
        raise SettingsError("resolution", f"{family.title} trains at sizes that are multiples of {family.size_multiple}; {size} is not")
    trains = family.trained_encoders(settings.train_encoders)
    parts = TokenParts.of(vectors, pipeline_text_widths(pipe), trains, placement.device)
    start_step = 0
    optimizer_state = None
    if resumed is not None:
        start_step = resumed.steps_done - phase_offset
        if start_step >= settings.steps:
            raise SettingsError(
                "steps", f"the resumed embedding was saved after {resumed.steps_done} steps; ask for more steps than that to continue"
            )
        optimizer_state, why_not = load_optimizer_state(resumed.optimizer_state_file, parts.trained, resumed.steps_done)
        reporter.resume_at(resumed.steps_done)
        reporter.log(f"Resuming after step {resumed.steps_done}" + (f" ({why_not}: the optimizer starts afresh)" if why_not else ""))
        why_not = writer.continue_average(resumed.path, parts.full(), resumed.steps_done)
        if why_not:
            reporter.log(f"The moving average (EMA) starts afresh: {why_not}")

    reporter.log(f"Encoding {len(images)} pictures{' and their mirror images' if settings.flip else ''} with the VAE, once: {describe_sizes(images)}")
    latents = encode_latents(pipe, images, placement, settings.flip)
    prompts = training_prompts(images, token, settings.style, settings.use_captions)
    previews = validation_prompts(settings.preview_prompts, settings.style)  # one column each, with a seed of its own
    # After the training prompts: the previews', then the empty prompt (their negative).
    preview_rows, negative_row = [len(prompts) + column for column in range(len(previews))], len(prompts) + len(previews)
    texts = [*prompts, *(fill_template(p, token) for p in previews), ""]
    encoded = []  # once per tokenizer: each has its own ids, markers, padding and length
    for tokenizer, text_encoder, length in zip(tokenizers(pipe), text_encoders(pipe), family.prompt_lengths(pipe)):
        vocab_size = text_encoder.get_input_embeddings().num_embeddings
        placeholder_ids = list(range(vocab_size, vocab_size + vectors.shape[0]))
        encoded.append([encode_with_placeholder(tokenizer, text, token, placeholder_ids, length) for text in texts])
    size_ids = family.size_conditioning(images, size)
    # A resumed run (or a later phase) draws new samples rather than replaying the first run's.
    seed = settings.seed + reporter.steps_done
    if not all(trains):
        kept = ", ".join(name for name, t in zip(family.embedding_keys, trains) if not t)
        learning = ", ".join(name for name, t in zip(family.embedding_keys, trains) if t)
        reporter.log(f"--train-encoders {settings.train_encoders}: the vectors for {learning} train; those for {kept} keep their start, "
                     "and those text encoders' prompt states are computed once")

    def on_step(_step: int, optimizer) -> None:
        release_freed_memory()
        done = reporter.steps_done
        writer.checkpoint(parts.full(), done, optimizer)
        if settings.preview_every and done % settings.preview_every == 0:  # a row of the validation grid
            for column, (prompt, row) in enumerate(zip(previews, preview_rows)):
                path = writer.output_dir / f"preview-step{done:05d}-{column + 1}.png"
                negative = negative_row if parked else None
                full = parts.full()
                with writer.averaged(full), parts.holding(full):  # the moving average, when the run keeps one
                    render_preview(pipe, placement, compute_loss, row, negative, size, settings.preview_steps, settings.seed + column, path)
                reporter.emit(Preview(done, str(path), fill_template(prompt, token)))

    loop = LoopSettings.of(settings, phase)
    optimizer = make_optimizer(parts.trained, loop, optimizer_state, start_step)
    denoiser = family.denoiser(pipe)
    with (
        extended_vocabularies_from(text_encoders(pipe), parts.sources()),
        activation_recomputation(denoiser, family.recomputed_layers(denoiser), settings.gradient_checkpointing),
        freed_memory_released_between_blocks(denoiser, placement),
    ):
        compute_loss = DiffusionLoss(
            pipe, placement, latents, encoded, settings.use_captions, settings.batch_size, settings.flip, seed, size_ids,
            [i.repeats for i in images], trains, len(prompts),
            unmasked_weight=settings.unmasked_weight, noise_offset=settings.noise_offset, min_snr_gamma=settings.min_snr_gamma,
        )
        reporter.log(f"Training objective from the pipeline: {compute_loss.schedule.num_timesteps} steps, predicting {compute_loss.schedule.prediction_type}")
        with off_the_accelerator([te for te, t in zip(text_encoders(pipe), trains) if not t], placement) as parked:
            try:
                optimize(parts.trained, compute_loss, loop, reporter, on_step, start_step=start_step, optimizer=optimizer, whole=lambda _: parts.full())
            finally:  # keep the last good vectors and their optimizer state, whatever happened
                writer.save(parts.full(), reporter.steps_done, optimizer[0])
    return parts.full().float().cpu()


@contextlib.contextmanager
def off_the_accelerator(modules: list, placement: Placement):
    """Within the block, `modules` (text encoders whose outputs were computed once) wait in the
    computer's memory instead of the accelerator's: T5-XXL is about 9.5 GB in bf16. Yields
    whether anything moved. The shared pipeline gets them back at the end."""
    if placement.device.type == "cpu" or not modules:
        yield False
        return
    for module in modules:
        module.to("cpu")
    release_freed_memory()
    try:
        yield True
    finally:
        for module in modules:
            module.to(placement.device)


def starting_vectors(pipe, init: str | None, count: int, seed: int) -> torch.Tensor:
    """The token's `count` vectors before training, from `init`'s words (else random): one part
    per text encoder, side by side; vector i starts on the first tokenizer's token i in each."""
    first = tokenizers(pipe)[0]
    parts = [
        initial_vectors(text_encoder.get_input_embeddings().weight, tokenizer, init, count, seed, first_tokenizer=first)
        for tokenizer, text_encoder in zip(tokenizers(pipe), text_encoders(pipe))
    ]
    return torch.cat(parts, dim=1)


def train_textual_inversion(pipe, placement, images, settings, reporter, writer) -> torch.Tensor:
    """Textual inversion from --init (or random), or from where --resume's run stopped."""
    resumed = read_resume(settings.resume, pipe) if settings.resume else None
    vectors = resumed.vectors if resumed else starting_vectors(pipe, settings.init, settings.vectors, settings.seed)
    return train_diffusion(pipe, placement, images, settings, reporter, writer, vectors, "ti", resumed)


def train_quick_then_ti(clips, clip_images, pipe, placement, images, settings, reporter, writer, word_parts=None) -> torch.Tensor:
    """QuickEmbedding in CLIP space, then textual inversion from where it ended: one job, one
    progress scale (phases "quick" then "ti"). `word_parts`: the start of T5's part (SD 3.x,
    Flux.1), which QuickEmbedding keeps and textual inversion then trains."""
    import dataclasses

    from . import QUICK
    from .quick import train_quick

    quick_steps = settings.quick_steps
    resumed = read_resume(settings.resume, pipe) if settings.resume else None
    if resumed is not None and resumed.steps_done < quick_steps:
        raise SettingsError(
            "resume", f"that file was saved during the QuickEmbedding phase (step {resumed.steps_done} of {quick_steps}); start afresh instead"
        )
    if resumed is None:
        quick_settings = dataclasses.replace(
            settings, method=QUICK, steps=quick_steps, batch_size=None, lr=None, weight_decay=None,
            lr_schedule=None, grad_clip=None, grad_accum=None, scale_lr=None, warmup_steps=0, quick_steps=None,
        ).resolved()
        vectors = train_quick(clips, clip_images, quick_settings, reporter, writer, phase="quick", word_parts=word_parts).vectors
        if reporter.should_stop():
            return vectors
        reporter.log("QuickEmbedding done; textual inversion continues from its vectors")
    else:
        vectors = resumed.vectors
    return train_diffusion(pipe, placement, images, settings, reporter, writer, vectors, "ti", resumed, phase_offset=quick_steps)
