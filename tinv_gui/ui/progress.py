"""What the Train tab shows, computed from a job's events: the progress line, the loss curve
(raw and smoothed, one pair per phase), the previews, the log and the outputs."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..checkpoint_scores import RULE, recommend, scaled
from ..events import (
    CheckpointScore,
    Event,
    Failed,
    Finished,
    Log,
    Preview,
    Progress,
    Started,
    VectorNorms,
)
from ..vector_norms import out_of_range_text

SMOOTHING = 0.9  # weight of the past in the smoothed curve (an exponential moving average)
MAX_PLOT_POINTS = 500  # per curve: more only slows the browser, which redraws on every update
LOSS_COLUMNS = ["step", "loss", "curve", "phase"]
POLL_S = 0.4  # how often a handler following a job looks at its events


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def loss_frame(progress: list[Progress], smoothing: float = SMOOTHING) -> pd.DataFrame:
    """Rows (step, loss, curve, phase) for the loss plot: every phase gets a raw curve and a
    smoothed one. The moving average restarts with each phase (their losses differ in scale) and
    is corrected for its start, so the first points are not pulled towards zero. Long runs are
    thinned to MAX_PLOT_POINTS per curve (the average still sees every step)."""
    rows = []
    average, weight, phase = 0.0, 0.0, None
    stride = -(-len(progress) // MAX_PLOT_POINTS)
    for i, event in enumerate(progress):
        if event.phase != phase:
            average, weight, phase = 0.0, 0.0, event.phase
        average = smoothing * average + (1 - smoothing) * event.loss
        weight = smoothing * weight + (1 - smoothing)
        if i % stride and i != len(progress) - 1:
            continue
        rows.append((event.step, event.loss, f"{event.phase} (raw)", event.phase))
        rows.append((event.step, average / weight, f"{event.phase} (smoothed)", event.phase))
    # Typed even when empty: the plot picks its axes' kinds from the first frame it gets, and an
    # empty frame's default "object" columns would make the steps categories instead of numbers.
    return pd.DataFrame(rows, columns=LOSS_COLUMNS).astype({"step": "int64", "loss": "float64", "curve": str, "phase": str})


# A light (raw) and a dark (smoothed) shade per phase, in the order phases appear.
PHASE_COLOURS = (("#9db9e8", "#1f4fa8"), ("#f4b98c", "#c2410c"), ("#a8d8a1", "#2e7d32"), ("#d5b5ea", "#6a1b9a"))


def loss_colours(progress: list[Progress]) -> dict[str, str] | None:
    """Curve name -> colour; None before the first step. The plot fixes its colours when the
    map changes (not when only the data does), so a new phase must come with a new map to be
    drawn at all; an empty map (rather than None) would leave the curves without colour."""
    if not progress:
        return None
    phases = list(dict.fromkeys(event.phase for event in progress))
    colours = {}
    for phase, (light, dark) in zip(phases, PHASE_COLOURS * (len(phases) // len(PHASE_COLOURS) + 1)):
        colours[f"{phase} (raw)"] = light
        colours[f"{phase} (smoothed)"] = dark
    return colours


NORM_COLUMNS = ["step", "norm", "curve"]
BAND_COLOUR = "#9e9e9e"


def norm_frame(norms: list[VectorNorms]) -> pd.DataFrame:
    """Rows (step, norm, curve) for the vector-length plot: one curve per learned vector, and the
    band of the model's ordinary words as two flat lines (per text encoder)."""
    rows = []
    for event in norms:
        for name, values in event.norms.items():
            prefix = "" if name == "text encoder" else f"{name} "
            rows += [(event.step, norm, f"{prefix}vector {i + 1}") for i, norm in enumerate(values)]
    if norms:
        for name, (low, high) in norms[-1].ordinary.items():
            prefix = "" if name == "text encoder" else f"{name} "
            for step in (norms[0].step, norms[-1].step):
                rows += [(step, low, f"{prefix}ordinary words (low)"), (step, high, f"{prefix}ordinary words (high)")]
    return pd.DataFrame(rows, columns=NORM_COLUMNS).astype({"step": "int64", "norm": "float64", "curve": str})


def norm_colours(norms: list[VectorNorms]) -> dict[str, str] | None:
    """Curve name -> colour: the band grey, the vectors in the phase colours' dark shades."""
    if not norms:
        return None
    curves = list(dict.fromkeys(norm_frame(norms[-1:])["curve"]))
    shades = [dark for _, dark in PHASE_COLOURS]
    vectors = [c for c in curves if "ordinary words" not in c]
    return {c: (BAND_COLOUR if "ordinary words" in c else shades[vectors.index(c) % len(shades)]) for c in curves}


def norm_warning(norms: list[VectorNorms]) -> str:
    """The warning when the latest vectors lie outside the band of the model's words, else ""."""
    if not norms:
        return ""
    last = norms[-1]
    outside = [
        out_of_range_text(name, i, norm, *last.ordinary[name], len(values))
        for name, values in last.norms.items()
        for i, norm in enumerate(values)
        if not last.ordinary[name][0] <= norm <= last.ordinary[name][1]
    ]
    if not outside:
        return ""
    more = f" ({len(outside) - 1} more vector{'s' if len(outside) > 2 else ''} too.)" if len(outside) > 1 else ""
    return f"**Warning, step {last.step}:** {outside[0]}{more}"


SCORE_COLUMNS = ["step", "score", "curve"]
SCORE_COLOURS = {"likeness (image similarity)": "#1f4fa8", "editability (text similarity)": "#c2410c"}


def score_frame(scores: list[CheckpointScore]) -> pd.DataFrame:
    """Rows (step, score, curve) for the checkpoint plot: likeness and editability, each scaled
    from the worst checkpoint (0) to the best (1), as the recommendation weighs them."""
    ordered = sorted(scores, key=lambda s: s.step)
    likeness = scaled([s.image_similarity for s in ordered])
    editability = scaled([s.text_similarity for s in ordered])
    rows = [(s.step, a, "likeness (image similarity)") for s, a in zip(ordered, likeness)]
    rows += [(s.step, b, "editability (text similarity)") for s, b in zip(ordered, editability)]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS).astype({"step": "int64", "score": "float64", "curve": str})


def score_text(scores: list[CheckpointScore]) -> str:
    """The recommended checkpoint and every checkpoint's figures, in Markdown."""
    best = recommend(scores)
    if best is None:
        return ""
    rows = "".join(
        f"\n| {s.step} | {s.image_similarity:.4f} | {s.text_similarity:.4f} | `{Path(s.path).name}`{' **recommended**' if s is best else ''} |"
        for s in sorted(scores, key=lambda s: s.step)
    )
    return (
        f"**Recommended checkpoint: step {best.step}** (`{Path(best.path).name}`, offered first in the downloads). "
        f"How it is chosen: {RULE}.\n\n| step | likeness | editability | file |\n| --- | --- | --- | --- |{rows}"
    )


@dataclass
class RunView:
    """Everything the Train tab shows about one job, rebuilt from its event history."""

    status: str = "idle"  # idle, queued, loading, running, finished, stopped, failed
    description: str = ""
    progress: list[Progress] = field(default_factory=list)
    previews: list[tuple[str, str]] = field(default_factory=list)  # (path, caption)
    norms: list[VectorNorms] = field(default_factory=list)  # the learned vectors' lengths as the run went
    scores: list[CheckpointScore] = field(default_factory=list)  # saved checkpoints' likeness and editability
    log: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # evaluation figures, when the job sends them
    message: str = ""  # the failure, said so a person can act on it
    queue_position: int = 0
    queue_wait_s: float | None = None  # expected seconds before it starts, when known

    @classmethod
    def from_events(cls, events: list[Event], queue_position: int = 0, queue_wait_s: float | None = None) -> RunView:
        view = cls(status="queued" if queue_position else "loading", queue_position=queue_position, queue_wait_s=queue_wait_s)
        for event in events:
            if isinstance(event, Started):
                view.description = event.description
                view.log.append(f"Started: {event.description}")
            elif isinstance(event, Progress):
                view.status = "running"
                view.progress.append(event)
            elif isinstance(event, Log):
                view.log.append(event.message)
            elif isinstance(event, VectorNorms):
                view.norms.append(event)
            elif isinstance(event, CheckpointScore):
                view.scores.append(event)
            elif isinstance(event, Preview):
                view.previews.append((event.path, f"step {event.step}: {event.prompt}"))
            elif isinstance(event, Finished):
                view.status = "stopped" if event.stopped_early else "finished"
                view.outputs = dict(event.outputs)
                view.metrics = dict(event.metrics)
                view.log.append("Stopped early; the embedding so far was saved." if event.stopped_early else "Finished.")
            elif isinstance(event, Failed):
                view.status = "failed"
                view.outputs = dict(event.outputs)
                view.message = event.message
                view.log.append(f"Failed: {event.message}")
        return view

    @property
    def done(self) -> bool:
        return self.status in ("finished", "stopped", "failed")

    def summary(self, doing: str = "Training") -> str:
        """One line: where the run is, how fast it goes and how long is left."""
        if self.status == "idle":
            return "Not started yet. Add pictures, choose a method, then press Start training."
        if self.status == "queued":
            wait = f" Expected wait: about {format_seconds(self.queue_wait_s)}." if self.queue_wait_s is not None else ""
            return f"Waiting for the GPU/CPU: {self.queue_position} job(s) ahead of yours.{wait}"
        last = self.progress[-1] if self.progress else None
        if last is None:
            if self.status == "failed":
                return f"Failed: {self.message}"
            return (self.log[-1] if self.log else "Loading the model…") if self.status == "loading" else self.status
        speed = last.step / last.elapsed_s if last.elapsed_s > 0 else 0.0
        parts = [f"step {last.step} / {last.total}", f"{speed:.2f} steps/s", f"loss {last.loss:.4f}", f"phase: {last.phase}"]
        if self.status == "running":
            parts.insert(2, f"about {format_seconds(last.eta_s)} left")
            return f"{doing}: " + " · ".join(parts)
        headline = {"finished": "Done", "stopped": "Stopped", "failed": "Failed"}[self.status]
        parts.insert(2, f"took {format_seconds(last.elapsed_s)}")
        text = f"{headline}: " + " · ".join(parts)
        return text + (f". {self.message}" if self.message else "")

    def progress_html(self) -> str:
        """A progress bar with the summary line under it."""
        last = self.progress[-1] if self.progress else None
        fraction = last.step / last.total if last and last.total else (1.0 if self.status == "finished" else 0.0)
        colour = {"failed": "#c0392b", "stopped": "#d68910"}.get(self.status, "var(--color-accent)")
        return (
            '<div class="tinv-progress">'
            f'<div class="tinv-bar"><div style="width:{100 * fraction:.1f}%;background:{colour}"></div></div>'
            f'<p>{html.escape(self.summary())}</p></div>'
        )

    def loss_frame(self) -> pd.DataFrame:
        return loss_frame(self.progress)

    def norm_frame(self) -> pd.DataFrame:
        return norm_frame(self.norms)

    def score_frame(self) -> pd.DataFrame:
        return score_frame(self.scores)

    @property
    def preview_columns(self) -> int:
        """Columns of the validation grid: one per prompt (a row per preview step)."""
        return max(1, len({caption.split(": ", 1)[1] for _, caption in self.previews}))

    def log_text(self, last: int = 200) -> str:
        return "\n".join(self.log[-last:])
