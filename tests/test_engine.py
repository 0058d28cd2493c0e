"""The engine: events in order, stop within a step keeping the embedding, clear failures, warm models."""

import threading

import pytest

from tinv_gui.engine import Engine
from tinv_gui.events import Failed, Finished, Progress, Started
from tinv_gui.formats import read_embedding
from tinv_gui.settings import SettingsError, TrainSettings


@pytest.fixture(scope="module")
def engine():
    from tinv_gui.models import ModelStore

    return Engine(ModelStore())


def quick(picture_dir, out, **kw):
    return TrainSettings(images=picture_dir, token="<e>", init="toy", output_dir=str(out), batch_size=4, method="quick", **kw)


def test_events_stream_in_order_and_models_stay_warm(engine, picture_dir, tmp_path):
    job = engine.train(quick(picture_dir, tmp_path / "a", steps=4))
    events = list(job.events())
    assert isinstance(events[0], Started) and events[0].total_steps == 4
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert all(p.phase == "quick" and p.elapsed_s >= 0 and p.lr > 0 for p in progress)
    assert progress[-1].eta_s == 0
    assert isinstance(events[-1], Finished) and not events[-1].stopped_early
    read = read_embedding(events[-1].outputs["embedding"])
    token, vectors = read.token, read.vectors
    assert token == "<e>" and vectors.shape == (1, 64)
    loads = engine.store.loads
    assert isinstance(engine.train(quick(picture_dir, tmp_path / "b", steps=2)).wait(), Finished)
    assert engine.store.loads == loads  # the second job did not load the model again


def test_cancel_stops_within_a_step_and_keeps_the_embedding(engine, picture_dir, tmp_path):
    job = engine.train(quick(picture_dir, tmp_path / "c", steps=500))
    stopped_at = None
    for event in job.events():
        if isinstance(event, Progress) and event.step == 3:
            job.cancel()
            stopped_at = event.step
        last = event
    assert isinstance(last, Finished) and last.stopped_early
    steps = [e.step for e in job.history if isinstance(e, Progress)]
    assert steps[-1] <= stopped_at + 1  # at most the step already under way
    vectors = read_embedding(last.outputs["embedding"]).vectors
    assert vectors.isfinite().all()


def test_failures_are_messages_not_tracebacks(engine, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    event = engine.train(quick(empty, tmp_path / "d", steps=2)).wait()
    assert isinstance(event, Failed) and "no pictures" in event.message and "Traceback" not in event.message
    assert not (tmp_path / "d" / "learned_embeds.safetensors").exists()
    with pytest.raises(SettingsError, match="steps"):
        engine.train(quick(empty, tmp_path / "e", steps=0))


def test_jobs_run_one_at_a_time(engine, picture_dir, tmp_path):
    running = []
    overlap = threading.Event()

    def work(reporter):
        running.append(1)
        if len(running) > 1:
            overlap.set()
        threading.Event().wait(0.2)
        running.pop()
        return {}

    jobs = [engine.submit("sleep", work) for _ in range(3)]
    assert engine.position(jobs[2]) >= 1
    assert all(isinstance(j.wait(), Finished) for j in jobs)
    assert not overlap.is_set()


def _submit_in_child(engine, results) -> None:
    job = engine.submit("in a fork", lambda reporter: {"pid": str(__import__("os").getpid())})
    results.put(job.wait().outputs)


def test_a_forked_process_runs_its_own_jobs(engine):
    """ZeroGPU runs every GPU call in a fork of the server: jobs submitted there must still run."""
    import multiprocessing
    import os

    assert engine.submit("in the parent", lambda reporter: {}).wait().kind == "finished"  # the parent's thread exists
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_submit_in_child, args=(engine, results))
    child.start()
    try:
        outputs = results.get(timeout=60)  # without a thread of its own the child's job never starts
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert outputs["pid"] == str(child.pid) != str(os.getpid())
    assert engine.submit("in the parent again", lambda reporter: {}).wait().kind == "finished"
