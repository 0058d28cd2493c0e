"""Which step to keep, and is it overcooked: checkpoint scores with a recommendation, the learned
vectors' norms against the model's own words, the prompt tokens the word takes."""

import json
from pathlib import Path

import pytest
import torch

from tinv_gui.checkpoint_scores import recommend
from tinv_gui.events import CheckpointScore, Log, Reporter, VectorNorms
from tinv_gui.formats import read_embedding
from tinv_gui.jobs import run_training
from tinv_gui.settings import TrainSettings
from tinv_gui.ui.progress import RunView, norm_warning, score_text
from tinv_gui.vector_norms import NormWatch, ordinary_range

TOKEN = "<insight-toy>"


def table_with_norms(norms: torch.Tensor, dim: int) -> torch.Tensor:
    """A token table whose rows have the given lengths (random directions)."""
    rows = torch.nn.functional.normalize(torch.randn(len(norms), dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return rows * norms[:, None]


def test_norms_are_measured_per_encoder_against_its_own_words_with_one_warning_per_vector():
    small, large = table_with_norms(torch.linspace(1, 2, 1001), 4), table_with_norms(torch.linspace(10, 20, 1001), 6)
    assert ordinary_range(small) == pytest.approx((1.01, 1.99), abs=1e-3)  # the 1st and 99th percentiles
    events = []
    reporter = Reporter(events.append, total_steps=3)
    watch = NormWatch([small, large], ["clip_l", "clip_g"], reporter)
    inside = torch.cat([torch.full((2, 4), 0.75), torch.full((2, 6), 6.0)], dim=1)  # lengths 1.5 and 14.7: ordinary
    outside = inside.clone()
    outside[1, :4] = 2.0  # vector 2's clip_l part: length 4, past the band; its clip_g part stays ordinary
    for vectors in (inside, outside, outside):
        reporter.steps_done += 1
        watch(vectors)
    norms = [e for e in events if isinstance(e, VectorNorms)]
    assert [e.step for e in norms] == [1, 2, 3]
    assert norms[1].norms["clip_l"] == pytest.approx([1.5, 4.0]) and norms[1].norms["clip_g"] == pytest.approx([6 * 6**0.5] * 2)
    warnings = [e.message for e in events if isinstance(e, Log)]
    assert len(warnings) == 1 and "vector 2 (clip_l)" in warnings[0] and "overcooked" in warnings[0]
    assert norm_warning(norms) and not norm_warning(norms[:1])
    assert watch.summary(outside)["final"] == norms[-1].norms
    # A long run (measured every 5th step) stopped at step 3: the result still has its final lengths.
    stopped = NormWatch([small, large], ["clip_l", "clip_g"], Reporter(total_steps=1000))
    stopped.reporter.steps_done = 3
    stopped(outside)
    assert stopped.history == [] and stopped.summary(outside)["final"] == norms[-1].norms


def test_the_recommended_checkpoint_balances_likeness_and_editability():
    def score(step, likeness, editability):
        return CheckpointScore(step, f"step{step}", likeness, editability)

    rising_likeness = [score(100, 0.50, 0.30), score(200, 0.70, 0.28), score(300, 0.90, 0.10)]
    assert recommend(rising_likeness).step == 200  # not the likest (300) nor the most editable (100)
    assert recommend([score(100, 0.5, 0.3), score(200, 0.5, 0.3)]).step == 100  # a tie: the earlier
    assert recommend([]) is None
    assert recommend([score(100, float("nan"), 0.3), score(200, 0.5, 0.2)]).step == 200  # a figure that is no number
    assert recommend([score(100, 0.5, float("nan"))]) is None
    assert "**Recommended checkpoint: step 200**" in score_text(rising_likeness)


def test_a_validation_prompt_without_the_word_is_refused_naming_it():
    from tinv_gui.settings import SettingsError

    settings = dict(images="photos", token=TOKEN, method="textual-inversion", score_checkpoints="after")
    with pytest.raises(SettingsError, match=r"preview_prompts: 'a watercolor' does not use the word: put \{\}"):
        TrainSettings(**settings, preview_prompts=["a photo of {}", "a watercolor"]).resolved()
    TrainSettings(**settings, preview_prompts=[f"a watercolor of {TOKEN}", "{} on a beach", " "]).resolved()  # the word itself is fine


@pytest.fixture(scope="module")
def scored_run(store, tmp_path_factory):
    """One short QuickEmbedding run, saving every 2 steps, scored after the run."""
    from conftest import make_picture

    folder = tmp_path_factory.mktemp("pictures")
    for i in range(3):
        make_picture(i).save(folder / f"picture{i}.png")
    out = tmp_path_factory.mktemp("run")
    events = []
    settings = TrainSettings(
        images=str(folder), token=TOKEN, init="toy", method="quick", steps=5, batch_size=4, output_dir=str(out),
        save_every=2, score_checkpoints="after", preview_steps=1, preview_prompts=["a photo of {} on a beach"],
    ).resolved()
    outputs = run_training(settings, store, Reporter(events.append, total_steps=settings.total_steps))
    return outputs, events, json.loads(Path(outputs["result"]).read_text())


def test_every_checkpoint_and_the_final_embedding_are_scored_after_the_run(scored_run):
    outputs, events, result = scored_run
    scores = [e for e in events if isinstance(e, CheckpointScore)]
    assert [(s.step, Path(s.path).name) for s in scores] == [
        (2, "learned_embeds-step00002.safetensors"), (4, "learned_embeds-step00004.safetensors"), (5, "learned_embeds.safetensors")
    ]
    saved = [e for e in events if isinstance(e, Log) and e.message.startswith("saved")]
    assert events.index(saved[-1]) < events.index(scores[0])  # after the run
    table = result["checkpoint_scores"]
    assert [(c["step"], c["likeness"], c["editability"]) for c in table["checkpoints"]] == [
        (s.step, s.image_similarity, s.text_similarity) for s in scores
    ]
    assert table["recommended"]["path"] == outputs["recommended"] == recommend(scores).path
    assert table["prompts"] == [f"a photo of {TOKEN} on a beach"]
    logged = "\n".join(e.message for e in events if isinstance(e, Log))
    assert "<- recommended" in logged and "learned_embeds-step00004.safetensors" in logged  # the table, for the CLI


def test_the_norm_curve_and_the_prompt_room_are_in_the_result(scored_run, store):
    outputs, events, result = scored_run
    norms = [e for e in events if isinstance(e, VectorNorms)]
    assert [e.step for e in norms] == [1, 2, 3, 4, 5]
    final = read_embedding(outputs["embedding"]).vectors
    assert norms[-1].norms["text encoder"] == pytest.approx(final.norm(dim=1).tolist())
    table = store.pipeline("demo").text_encoder.get_input_embeddings().weight
    assert result["vector_norms"]["ordinary_range"]["text encoder"] == pytest.approx(list(ordinary_range(table)))
    assert [point["step"] for point in result["vector_norms"]["curve"]] == [1, 2, 3, 4, 5]
    assert result["prompt_tokens"] == {"used": 1, "of": 75}

    view = RunView.from_events(events)
    frame = view.norm_frame()
    assert set(frame["curve"]) == {"vector 1", "ordinary words (low)", "ordinary words (high)"}
    assert len(view.score_frame()) == 2 * 3  # likeness and editability at each scored step


def test_scoring_that_fails_is_given_up_with_a_warning_not_the_run(tmp_path):
    from tinv_gui.checkpoint_scores import CheckpointScorer
    from tinv_gui.models import ModelLoadError

    class Offline:
        def pipeline(self, *args):
            raise ModelLoadError("openai/clip-vit-large-patch14 is not in the cache and the Hub cannot be reached")

    events = []
    settings = TrainSettings(images=str(tmp_path), token=TOKEN, save_every=1, score_checkpoints="during")
    scorer = CheckpointScorer(settings, Offline(), None, Reporter(events.append, total_steps=2))
    scorer.saved(str(tmp_path / "learned_embeds-step00001.safetensors"), 1)
    scorer.saved(str(tmp_path / "learned_embeds-step00002.safetensors"), 2)
    scorer.finish([(1, "a"), (2, "b")], str(tmp_path / "learned_embeds.safetensors"), 2)
    warnings = [e.message for e in events if isinstance(e, Log) and e.message.startswith("warning")]
    assert len(warnings) == 1 and "cannot be scored: openai/clip-vit-large-patch14 is not in the cache" in warnings[0]
    assert scorer.recommended is None and scorer.summary()["recommended"] is None


def test_the_recommended_checkpoint_is_offered_once_and_opened_in_the_playground(scored_run, tmp_path):
    import shutil

    from tinv_gui.jobs import export_for_other_tools
    from tinv_gui.ui.tab_playground import PlaygroundTab
    from tinv_gui.ui.tab_train import TrainTab
    from tinv_gui.ui.workspace import Workspaces

    outputs, _, result = scored_run
    ws = Workspaces(tmp_path / "visitors").get("visitor-r")
    run = ws.runs / "run"
    shutil.copytree(Path(outputs["embedding"]).parent, run)
    copied = {"embedding": str(run / "learned_embeds.safetensors")}
    copied.update(export_for_other_tools(copied["embedding"]))

    class Playground(PlaygroundTab):
        def workspace(self, request):
            return ws

    def recommend_step(step: int, name: str) -> None:
        result["checkpoint_scores"]["recommended"] = {"step": step, "path": str(run / name)}
        (run / "result.json").write_text(json.dumps(result))

    # The pick is the last step, which save_every also kept as a numbered copy: one file, labelled.
    shutil.copy(run / "learned_embeds.safetensors", run / "learned_embeds-step00005.safetensors")
    recommend_step(5, "learned_embeds-step00005.safetensors")
    files = TrainTab.download_files(ws, copied)
    names = [path.name for path, _ in files]
    assert "learned_embeds-step00005.safetensors" not in names and names[0] == "learned_embeds.safetensors"
    assert files[0][1].startswith("the recommended checkpoint (step 5, the last")
    _, chosen, prompt = Playground().try_in_playground(None)
    assert chosen["value"] == "runs/run/learned_embeds.safetensors" and prompt == f"a photo of {TOKEN}"

    # An earlier pick comes first in the downloads, and the Playground opens it, saying so.
    recommend_step(2, "learned_embeds-step00002.safetensors")
    files = TrainTab.download_files(ws, copied)
    assert [path.name for path, _ in files][:2] == ["learned_embeds-step00002.safetensors", "learned_embeds.safetensors"]
    assert files[0][1].startswith("the recommended checkpoint (step 2,") and "recommended" not in files[1][1]
    _, chosen, _ = Playground().try_in_playground(None)
    assert chosen["value"] == "runs/run/learned_embeds-step00002.safetensors"
    labels = dict((value, label) for label, value in chosen["choices"])
    assert "2 steps, the recommended checkpoint" in labels["runs/run/learned_embeds-step00002.safetensors"]
    assert "recommended" not in labels["runs/run/learned_embeds.safetensors"]


@pytest.mark.parametrize("ending", ["stopped", "failed"])
def test_a_run_ending_between_two_measured_steps_ends_its_norm_curve_on_the_saved_vectors(store, tmp_path, picture_dir, ending):
    from tinv_gui.events import Progress

    settings = TrainSettings(
        images=str(picture_dir), token=TOKEN, init="toy", method="quick", steps=400, batch_size=2, output_dir=str(tmp_path),
    ).resolved()  # 400 steps: the norms are measured every 2nd step

    def emit(event):
        events.append(event)
        if isinstance(event, Progress) and event.step == 3:  # between the measures of steps 2 and 4
            if ending == "failed":
                raise RuntimeError("the disk went away")
            reporter.stop_event.set()

    events = []
    reporter = Reporter(emit, total_steps=settings.total_steps)
    if ending == "failed":
        with pytest.raises(RuntimeError, match="the disk went away"):
            run_training(settings, store, reporter)
    else:
        result = json.loads(Path(run_training(settings, store, reporter)["result"]).read_text())
    norms = [e for e in events if isinstance(e, VectorNorms)]
    assert [e.step for e in norms] == [2, 3]  # the last point: the step the embedding was kept at
    kept = read_embedding(tmp_path / "learned_embeds.safetensors")
    assert int(kept.metadata["steps"]) == 3
    assert norms[-1].norms["text encoder"] == pytest.approx(kept.vectors.norm(dim=1).tolist())
    assert RunView.from_events(events).norm_frame().query("curve == 'vector 1'")["step"].tolist() == [2, 3]
    if ending == "stopped":
        assert result["vector_norms"]["final"] == norms[-1].norms
        assert [point["step"] for point in result["vector_norms"]["curve"]] == [2, 3]
