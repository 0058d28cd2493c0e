"""Which step to keep? Each saved checkpoint is scored with the evaluation that exists
(tinv_gui.evaluate): pictures drawn with the checkpoint from the validation prompts (the preview
prompts, one fixed seed each), compared in CLIP space with the training pictures (likeness) and
with the prompts without the word (editability).

Likeness usually rises over a run while editability falls; the recommended checkpoint is the
best balance of the two: each figure is scaled from the worst checkpoint (0) to the best (1),
the two are added, and the checkpoint with the highest sum is recommended (an earlier one on a
tie). Scoring runs after the run, or during it as checkpoints are saved (the setting
`score_checkpoints`); during a diffusion run, the training's own extension of the text encoders
is set aside while a checkpoint draws (embeddings.plain_vocabularies).
"""

from __future__ import annotations

import math
from pathlib import Path

from .clip_space import image_features
from .data import fill_template, load_dataset, validation_prompts
from .embeddings import plain_vocabularies
from .evaluate import clip_similarities, without_token
from .events import CheckpointScore, Reporter
from .generate import generate
from .models import ModelStore, text_encoders

RULE = (
    "the best balance of likeness and editability: each is scaled from the worst checkpoint (0) to the best (1), "
    "and the checkpoint with the highest sum is recommended (the earlier one on a tie)"
)


def scored_saves(choice: str) -> tuple[str, int]:
    """The setting's value taken apart: ("off" | "after" | "during", every how many saves)."""
    when, _, every = choice.partition("-")
    return when, int(every or 1)


def scaled(values: list[float]) -> list[float]:
    """Each value from the lowest (0) to the highest (1); all 1 when they are equal."""
    low, high = min(values, default=0.0), max(values, default=0.0)
    return [(v - low) / (high - low) if high > low else 1.0 for v in values]


def recommend(scores: list[CheckpointScore]) -> CheckpointScore | None:
    """The checkpoint with the best balance of likeness and editability (RULE); None for none.
    A checkpoint with a figure that is not a number (NaN) is never the one."""
    scores = [s for s in scores if math.isfinite(s.image_similarity) and math.isfinite(s.text_similarity)]
    if not scores:
        return None
    likeness = scaled([s.image_similarity for s in scores])
    editability = scaled([s.text_similarity for s in scores])
    balance = [a + b for a, b in zip(likeness, editability)]
    return scores[max(range(len(scores)), key=lambda i: (balance[i], -scores[i].step))]


class CheckpointScorer:
    """Scores a run's checkpoints (TrainSettings `settings`, resolved) and keeps the scores.
    The pipeline and the CLIP model load on the first checkpoint (warm in the store)."""

    def __init__(self, settings, store: ModelStore, placement, reporter: Reporter):
        self.settings = settings
        self.store = store
        self.placement = placement
        self.reporter = reporter
        self.when, self.every = scored_saves(settings.score_checkpoints)
        self.token = settings.token.strip()
        self.prompts = [fill_template(p, self.token) for p in validation_prompts(settings.preview_prompts, settings.style)]
        self.scores: list[CheckpointScore] = []
        self._saves = 0
        self.failed = False  # scoring was given up (score says why)
        self._loaded = None
        self.guidance: float | None = None  # what the checkpoints are drawn at: the family's own (None before any is)

    def saved(self, path: str, step: int) -> None:
        """Called as each numbered checkpoint is saved (EmbeddingWriter.on_saved): scored now when
        scoring runs during the run and this is one of every `every` saves."""
        self._saves += 1
        if self.when == "during" and self._saves % self.every == 0:
            self.score(path, step)

    def finish(self, checkpoints: list[tuple[int, str]], final: str, final_step: int) -> None:
        """After the run: score what is left (after: every checkpoint and the final embedding;
        during: the final one), then log the table. `checkpoints` are (step, path) pairs. A
        stopped run scores nothing more."""
        candidates = dict(checkpoints)
        candidates.setdefault(final_step, final)  # a numbered copy of the same step is the same vectors
        wanted = candidates if self.when == "after" else {final_step: candidates[final_step]}
        scored = {s.step for s in self.scores}
        left = [(step, path) for step, path in sorted(wanted.items()) if step not in scored]
        for done, (step, path) in enumerate(left):
            if self.reporter.should_stop():
                self.reporter.log(f"Stopped: {len(left) - done} checkpoint(s) left unscored.")
                break
            self.score(path, step)
        if self.scores:
            for line in self.table().splitlines():
                self.reporter.log(line)

    def score(self, path: str, step: int) -> CheckpointScore | None:
        """Draw the validation prompts with the checkpoint `path`, score the pictures, and send
        the scores as an event. Scoring that fails (a CLIP model that cannot be loaded, say) is
        given up with a warning, never the run: None."""
        if self.failed:
            return None
        try:
            return self._score(path, step)
        except Exception as error:  # noqa: BLE001 - the scores are a help; the embedding is what the run is for
            from .engine import explain_failure

            self.failed = True
            self.reporter.log(f"warning: the checkpoints cannot be scored: {explain_failure(error).rstrip('.')}. Training goes on without scores.")
            return None

    def _score(self, path: str, step: int) -> CheckpointScore:
        pipe, clip, reference = self._load()
        likeness, editability = [], []
        family = self.store.family(self.settings.model)
        size = self.settings.resolution or family.native_resolution(pipe)
        self.guidance = family.default_guidance  # generate's default, as evaluate's and the Playground's
        with plain_vocabularies(text_encoders(pipe)):
            for column, prompt in enumerate(self.prompts):
                picture = generate(
                    pipe, prompt, embeddings=[path], steps=self.settings.preview_steps,
                    seed=self.settings.seed + column, size=(size, size), placement=self.placement,
                )
                image, text = clip_similarities(clip, picture, reference, without_token(prompt, self.token))
                likeness.append(image)
                editability.append(text)
        score = CheckpointScore(step, str(path), sum(likeness) / len(likeness), sum(editability) / len(editability))
        self.scores.append(score)
        self.reporter.emit(score)
        return score

    def _load(self):
        if self._loaded is None:
            self.reporter.log(f"Scoring checkpoints with {len(self.prompts)} prompt(s): {'; '.join(self.prompts)}")
            pipe = self.store.pipeline(self.settings.model, self.placement)
            clip = self.store.clip(self.settings.model, self.settings.clip_model, self.placement)
            pictures = load_dataset(self.settings.images, size=clip.image_size)
            self._loaded = pipe, clip, image_features(clip, [p.image for p in pictures], crops=1)
        return self._loaded

    @property
    def recommended(self) -> CheckpointScore | None:
        """The checkpoint recommended so far (recommend), None before any is scored."""
        return recommend(self.scores)

    def table(self) -> str:
        """The scores as a text table, the recommended checkpoint marked."""
        best = self.recommended
        lines = ["checkpoint scores (likeness: CLIP image similarity to your pictures; editability: CLIP text similarity to the prompt without the word)",
                 f"{'step':>8}  {'likeness':>9}  {'editability':>11}  file"]
        for s in sorted(self.scores, key=lambda s: s.step):
            mark = "  <- recommended" if s is best else ""
            lines.append(f"{s.step:>8}  {s.image_similarity:>9.4f}  {s.text_similarity:>11.4f}  {Path(s.path).name}{mark}")
        return "\n".join(lines)

    def summary(self) -> dict:
        """For the run's result file."""
        best = self.recommended
        return {
            "checkpoints": [
                {"step": s.step, "path": s.path, "likeness": s.image_similarity, "editability": s.text_similarity}
                for s in sorted(self.scores, key=lambda s: s.step)
            ],
            "recommended": None if best is None else {"step": best.step, "path": best.path},
            "rule": RULE,
            "prompts": self.prompts,
            "seeds": [self.settings.seed + i for i in range(len(self.prompts))],
            "denoising_steps": self.settings.preview_steps,
            "guidance": self.guidance,
        }
