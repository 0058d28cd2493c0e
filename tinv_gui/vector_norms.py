"""Is the embedding overcooked? The length (L2 norm) of each learned vector beside the lengths of
the model's own words.

An ordinary word's vector in CLIP's token table has a length within a narrow band; a learned
vector that grows far beyond it dominates every prompt it is in (the rest of the prompt stops
getting through: the embedding is no longer editable), which is the usual sign of too many
steps or too high a learning rate. The band is the ORDINARY_PERCENTILES of the vocabulary's row
norms, per text encoder (SDXL's two tables differ). A watch sends a VectorNorms event as the run
goes and a warning the first time a vector leaves the band.
"""

from __future__ import annotations

import torch

from .embeddings import split_columns
from .events import Reporter, VectorNorms
from .settings import MAX_PROMPT_LENGTH

ORDINARY_PERCENTILES = (1.0, 99.0)  # the band of "ordinary words" in the vocabulary's norms
MAX_NORM_EVENTS = 200  # per run: enough for a smooth curve, few enough for the page to redraw


def ordinary_range(table: torch.Tensor) -> tuple[float, float]:
    """(low, high): the ORDINARY_PERCENTILES of the row norms of a token table [vocabulary, dim]."""
    norms = table.detach().float().norm(dim=1).cpu()
    low, high = torch.quantile(norms, torch.tensor(ORDINARY_PERCENTILES) / 100).tolist()
    return low, high


def encoder_names(count: int, keys: tuple[str, ...] = ()) -> list[str]:
    """What each text encoder is called in the events: "text encoder" when there is one, else
    the family's embedding keys (SDXL: clip_l, clip_g)."""
    if count == 1:
        return ["text encoder"]
    return list(keys[:count]) if len(keys) >= count else [f"text encoder {i + 1}" for i in range(count)]


def tokens_used_text(vectors: int) -> str:
    """How much of a prompt the word takes, said plainly."""
    return f"the word takes {vectors} of a prompt's {MAX_PROMPT_LENGTH} tokens ({MAX_PROMPT_LENGTH - vectors} left for the rest of the prompt)"


class NormWatch:
    """Watches a run's vectors ([n, sum of the encoders' widths]) through the reporter
    (Reporter.vector_watchers): every so many steps (MAX_NORM_EVENTS in a run, and the step the
    run ended at: its last, or with `finish` the one it stopped or failed at) a VectorNorms
    event, and one warning per vector the first time it leaves its encoder's ordinary range. `history` keeps what was sent, for the run's result file."""

    def __init__(self, tables: list[torch.Tensor], names: list[str], reporter: Reporter):
        self.names = names
        self.widths = tuple(int(t.shape[1]) for t in tables)
        self.ordinary = {name: list(ordinary_range(t)) for name, t in zip(names, tables)}
        self.reporter = reporter
        self.every = max(1, reporter.total_steps // MAX_NORM_EVENTS)
        self.history: list[VectorNorms] = []
        self._warned: set[tuple[str, int]] = set()

    def __call__(self, vectors: torch.Tensor) -> None:
        """After a step: measure `vectors` when this step is one to send, and warn of new strays."""
        step = self.reporter.steps_done
        if step % self.every and step < self.reporter.total_steps:
            return
        self._send(step, vectors)

    def finish(self, final: torch.Tensor) -> None:
        """At the run's end (finished, stopped or failed): the `final` vectors (as saved) become
        the curve's last point when the run ended between two measured steps, so the plot ends
        where the embedding did (and on the lengths the result file gives as "final")."""
        step = self.reporter.steps_done
        if step > 0 and not (self.history and self.history[-1].step >= step):
            self._send(step, final)

    def _send(self, step: int, vectors: torch.Tensor) -> None:
        event = VectorNorms(step, self.measure(vectors), self.ordinary)
        self.history.append(event)
        self.reporter.emit(event)
        for name, norms in event.norms.items():
            low, high = self.ordinary[name]
            for i, norm in enumerate(norms):
                if (low <= norm <= high) or (name, i) in self._warned:
                    continue
                self._warned.add((name, i))
                self.reporter.log(f"warning: {out_of_range_text(name, i, norm, low, high, len(norms))}")

    def measure(self, vectors: torch.Tensor) -> dict[str, list[float]]:
        """The length of each vector ([n, sum of the encoders' widths]), per text encoder."""
        parts = split_columns(vectors.detach().float(), self.widths)
        return {name: part.norm(dim=1).tolist() for name, part in zip(self.names, parts)}

    def summary(self, final: torch.Tensor) -> dict:
        """The norms for the run's result file: the band, those of the `final` vectors (as saved:
        a run stopped between two measured steps, or before any, has them too) and the curve."""
        return {
            "ordinary_range": self.ordinary,
            "ordinary_percentiles": list(ORDINARY_PERCENTILES),
            "final": self.measure(final),
            "curve": [{"step": e.step, "norms": e.norms} for e in self.history],
        }


def out_of_range_text(name: str, index: int, norm: float, low: float, high: float, count: int) -> str:
    """The warning for one vector outside its encoder's band of ordinary words."""
    which = f"vector {index + 1}" if count > 1 else "the vector"
    where = f" ({name})" if name != "text encoder" else ""
    if norm > high:
        return (
            f"{which}{where} has grown to length {norm:.3g}, longer than {ORDINARY_PERCENTILES[1]:g}% of the model's own words "
            f"({low:.3g} to {high:.3g}): the embedding may be overcooked and stop following the rest of the prompt. "
            "An earlier checkpoint (Save every N steps), fewer steps or a lower learning rate help."
        )
    return (
        f"{which}{where} has shrunk to length {norm:.3g}, shorter than {100 - ORDINARY_PERCENTILES[0]:g}% of the model's own words "
        f"({low:.3g} to {high:.3g}): it may have little effect on the picture; lower the weight decay."
    )
