"""Holds of issue 16: a failed job, a full disk, a kill between two saves, a failed resume, an
unwritable output, signals. Each test reproduces a case that once went wrong."""

import errno
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_here
from safetensors.torch import load_file, save_file

from tinv_gui.embeddings import read_metadata, save_embedding
from tinv_gui.engine import Engine
from tinv_gui.events import Failed, Finished, Log, Progress
from tinv_gui.settings import TrainSettings
from tinv_gui.training import EMBEDDING_FILE, optimizer_state_path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def ti_settings(picture_dir, out, **overrides):
    values = dict(images=picture_dir, token="<hold>", init="toy", steps=3, batch_size=1, grad_accum=1, resolution=64,
                  output_dir=str(out), method="textual-inversion")
    return TrainSettings(**{**values, **overrides})


# ----------------------------------------------------------------------------- 8: exit after a failure
CRASHING_JOB = """
import sys, torch
from tinv_gui.cli import _run_job

class Busy:
    def __del__(self):  # PyTorch work (which lets go of the GIL) while the failed job is torn down
        a = torch.randn(500, 500)
        for _ in range(100):
            a = torch.tanh(a @ a)

def work(reporter):
    held = Busy()
    raise ValueError("broken on purpose")

sys.exit(_run_job(lambda engine: engine.submit("fails", work)))
"""


def test_a_failed_job_ends_with_its_message_and_status_2_not_an_abort():
    # The engine's thread, still inside PyTorch when the interpreter shut down, aborted the
    # process: "terminate called without an active exception", status 134.
    done = subprocess.run([sys.executable, "-c", CRASHING_JOB], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: broken on purpose" in done.stderr and "terminate called" not in done.stderr


def test_closing_the_engine_stops_its_jobs_and_its_thread():
    engine = Engine()
    started = threading.Event()

    def endless(reporter):
        started.set()
        while not reporter.should_stop():
            time.sleep(0.01)
        return {}

    running, queued = engine.submit("endless", endless), engine.submit("next", lambda r: {})
    assert started.wait(10)
    engine.close()
    assert not engine._thread.is_alive()
    assert running.done and queued.cancelled


# ----------------------------------------------------------------------------- 12: unwritable --output
@pytest.mark.parametrize("kind", ["existing file", "/dev/null", "inside a file"])
def test_an_unwritable_output_is_refused_before_anything_loads(tmp_path, picture_dir, kind, capsys):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("mine")
    output = {"existing file": blocker, "/dev/null": Path("/dev/null"), "inside a file": blocker / "out"}[kind]
    # A model that cannot be loaded: had the run got as far as loading, that is what it would say.
    done = cli_here(capsys, "train", "--model", "nobody/no-such-model", "--images", str(picture_dir), "--token", "<x>",
                    "--output", str(output), "--steps", "2")
    assert done.returncode == 2
    assert "output" in done.stderr and str(output) in done.stderr and "no-such-model" not in done.stderr, done.stderr
    assert "kept" not in done.stderr and "Traceback" not in done.stderr
    assert blocker.read_text() == "mine"


def test_a_failure_claims_a_kept_embedding_only_when_one_was_saved(tmp_path):
    engine = Engine()

    def fails_before_saving(reporter):
        raise RuntimeError("something broke")

    def fails_after_saving(reporter):
        reporter.outputs["embedding"] = str(tmp_path / EMBEDDING_FILE)
        raise RuntimeError("something broke")

    nothing = engine.submit("a", fails_before_saving).wait()
    something = engine.submit("b", fails_after_saving).wait()
    engine.close()
    assert isinstance(nothing, Failed) and "kept" not in nothing.message
    assert isinstance(something, Failed) and "last good embedding was kept" in something.message


# ----------------------------------------------------------------------------- 10, 11: the embedding and its optimizer state
def _scale_embedding(path: Path, factor: float) -> None:
    metadata = read_metadata(path)
    tensors = {k: v * factor for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)


def test_a_failed_resume_keeps_its_optimizer_state_paired_with_the_embedding(store, picture_dir, tmp_path):
    out = tmp_path / "out"
    engine = Engine(store)
    assert isinstance(engine.train(ti_settings(picture_dir, out)).wait(), Finished)
    embedding, state = out / EMBEDDING_FILE, optimizer_state_path(out / EMBEDDING_FILE)
    assert read_metadata(state)["steps"] == read_metadata(embedding)["steps"] == "3"
    _scale_embedding(embedding, 1e36)  # the next steps overflow

    event = engine.train(ti_settings(picture_dir, out, steps=8, resume=str(embedding))).wait()
    assert isinstance(event, Failed), event
    assert state.is_file(), "the failed resume deleted its own optimizer state"
    steps = read_metadata(embedding)["steps"]
    assert read_metadata(state)["steps"] == steps
    assert torch.isfinite(load_file(str(state))["exp_avg"]).all()


def test_an_optimizer_state_of_another_step_is_not_paired_with_the_embedding(store, picture_dir, tmp_path):
    out = tmp_path / "out"
    engine = Engine(store)
    assert isinstance(engine.train(ti_settings(picture_dir, out, steps=2)).wait(), Finished)
    state = optimizer_state_path(out / EMBEDDING_FILE)
    step2_state = state.read_bytes()
    assert isinstance(engine.train(ti_settings(picture_dir, out, resume=str(out / EMBEDDING_FILE))).wait(), Finished)
    # As a run killed between its two saves would leave them: the step-3 embedding, the step-2 state,
    # and a half-written temporary file.
    state.write_bytes(step2_state)
    (out / ".learned_embeds.safetensors.k1ll3d.tmp").write_bytes(b"half")

    job = engine.train(ti_settings(picture_dir, out, steps=4, resume=str(out / EMBEDDING_FILE)))
    event = job.wait()
    assert isinstance(event, Finished)
    logs = [e.message for e in job.history if isinstance(e, Log)]
    assert any("Resuming after step 3" in m and "step 2" in m and "starts afresh" in m for m in logs), logs
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert read_metadata(state)["steps"] == read_metadata(out / EMBEDDING_FILE)["steps"] == "4"


# ----------------------------------------------------------------------------- 13: signals
def _train_until_logging(picture_dir, out, log, **popen):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinv_gui", "train", "--model", "demo", "--images", str(picture_dir), "--token", "<sig>",
         "--init", "toy", "--steps", "100000", "--batch-size", "4", "--output", str(out), "--log-jsonl", str(log)],
        cwd=ROOT, env=ENV, **popen,
        # A terminal's process gets SIGHUP's default, even when this suite runs under nohup
        # (an ignored signal is inherited, and an ignored SIGHUP rightly does not stop a run).
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.2)
    assert proc.poll() is None and log.exists(), "no progress within the time limit"
    return proc


def test_closing_the_terminal_saves_the_embedding_and_exits_129(picture_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    terminal, child_side = pty.openpty()
    drained = []

    def drain():  # read the terminal as a terminal window would, until it is closed
        try:
            while chunk := os.read(terminal, 4096):
                drained.append(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = _train_until_logging(picture_dir, out, log, stdin=child_side, stdout=child_side, stderr=child_side)
    os.close(child_side)
    os.close(terminal)  # the window is closed: writes to it now fail, and SIGHUP comes
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert torch.isfinite(load_file(str(out / EMBEDDING_FILE))["<sig>"]).all()


def test_ctrl_c_while_starting_up_prints_no_traceback(picture_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinv_gui", "train", "--model", "demo", "--images", str(picture_dir), "--token", "<x>",
         "--output", str(tmp_path / "out")],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)  # importing the libraries takes several seconds
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "interrupted" in stderr


def test_a_ctrl_c_that_a_library_swallowed_while_loading_still_stops_the_run(picture_dir, tmp_path, monkeypatch, capsys):
    from tinv_gui import cli

    quiet = cli._quiet_libraries

    def a_library_that_swallows_the_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler runs here
        except KeyboardInterrupt:  # as C code that clears any error it meets does
            pass
        quiet()

    monkeypatch.setattr(cli, "_quiet_libraries", a_library_that_swallows_the_interrupt)
    done = cli_here(capsys, "train", "--method", "quick", "--model", "demo", "--images", picture_dir, "--token", "<x>",
                    "--init", "toy", "--steps", "200", "--output", tmp_path / "out")
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert "stopped early by SIGINT" in done.stderr and "Traceback" not in done.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


# ----------------------------------------------------------------------------- 9: a full disk
def test_a_log_that_cannot_be_written_never_costs_the_embedding(picture_dir, tmp_path, capsys):
    # /dev/full: every write fails with ENOSPC, as on a full disk.
    done = cli_here(capsys, "train", "--method", "quick", "--model", "demo", "--images", str(picture_dir), "--token", "<log>",
                    "--init", "toy", "--steps", "4", "--batch-size", "4", "--output", str(tmp_path / "out"), "--log-jsonl", "/dev/full")
    assert done.returncode == 0, done.stderr
    assert "cannot write the log /dev/full (the disk is full)" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / EMBEDDING_FILE).is_file()


def _fill_the_disk(monkeypatch, owner, name: str, error: Exception) -> None:
    """Make `owner.name(obj, file, ...)` write half a file and fail as that library does on a
    full disk, with the disk reported full."""
    import shutil

    def half_then_fail(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, os.PathLike)))
        with open(target, "wb") as half:
            half.write(b"half a fi")
        raise error

    monkeypatch.setattr(owner, name, half_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 0})())


def test_generate_on_a_full_disk_keeps_the_earlier_picture_and_names_the_disk(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from tinv_gui import cli

    picture = tmp_path / "moon.png"
    args = ["generate", "--model", "demo", "--prompt", "a cat", "--steps", "2", "--size", "64x64", "--output", str(picture)]
    assert cli.main(args) == 0
    good = picture.read_bytes()
    _fill_the_disk(monkeypatch, Image.Image, "save", OSError(errno.ENOSPC, "No space left on device"))
    assert cli.main([*args[:-1], str(picture)]) == 2
    err = capsys.readouterr().err
    assert f"the disk is full while writing {picture}" in err and "Traceback" not in err
    assert picture.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["moon.png"]


def test_convert_on_a_full_disk_keeps_the_earlier_file_and_names_the_disk(tmp_path, monkeypatch, capsys):
    from tinv_gui import cli

    source = tmp_path / "learned_embeds.safetensors"
    save_embedding(source, "<full>", torch.randn(1, 32))
    target = tmp_path / "full.pt"
    target.write_bytes(b"an earlier good file")
    _fill_the_disk(monkeypatch, Path, "write_bytes", OSError(errno.ENOSPC, "No space left on device"))
    assert cli.main(["convert", str(source), "--format", "a1111-pt", "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"the disk is full while writing {target}" in err and "Errno" not in err
    assert target.read_bytes() == b"an earlier good file" and not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_is_named_whichever_library_was_writing(tmp_path, monkeypatch):
    from tinv_gui import files

    target = tmp_path / "state.pt"
    target.write_bytes(b"an earlier good file")
    # torch.save says "basic_ios::clear: iostream error" when the disk fills.
    _fill_the_disk(monkeypatch, files.torch, "save", RuntimeError("[enforce fail at inline_container.cc:603] . basic_ios::clear"))
    with pytest.raises(OSError) as full:
        files.atomic_torch_save({"x": torch.zeros(2)}, target)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(target)
    assert target.read_bytes() == b"an earlier good file" and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- 2: shared mode
def test_a_shared_server_takes_no_server_path_in_any_model_field(tmp_path, monkeypatch, picture_dir):
    import gradio as gr

    from tinv_gui.ui import dataset
    from tinv_gui.ui.app import TinvApp
    from tinv_gui.ui.workspace import Workspaces

    monkeypatch.setenv("TINV_GUI_SHARED", "1")
    app = TinvApp(workspaces=Workspaces(tmp_path / "visitors"), hub=(False, "offline"))
    ws = app.workspaces.get("visitor-a")
    dataset.add_files(ws, [str(p) for p in picture_dir.iterdir()])
    existing, missing = str(picture_dir), str(tmp_path / "no-such-folder")
    for field in ("clip_model", "clip_model_g", "caption_model"):
        answers = []
        for path in (existing, missing, "/etc", "../../x/.."):
            with pytest.raises(gr.Error) as refused:
                app._submit_training(ws, "demo", "<x>", "", "Quick", [], {field: path})
            answers.append(str(refused.value).replace(path, "NAME"))
        assert "Hugging Face Hub" in answers[0]
        assert len(set(answers)) == 1, answers  # an existing path and a missing one get the same answer
    from tinv_gui.models import ModelLoadError

    for path in (existing, missing):  # the Playground loads through the same store
        with pytest.raises(ModelLoadError, match="Hugging Face Hub"):
            app.engine.store.pipeline(path)


# ----------------------------------------------------------------------------- 6, 7: returning visitors
class _Request:
    def __init__(self, session_hash):
        self.session_hash = session_hash


def _page(tmp_path, monkeypatch):
    from tinv_gui.ui.app import TinvApp
    from tinv_gui.ui.workspace import Workspaces

    monkeypatch.delenv("TINV_GUI_SECRET", raising=False)
    app = TinvApp(workspaces=Workspaces(tmp_path / "visitors"), hub=(False, "offline"))
    app.build()
    return app


def test_a_restart_keeps_the_secret_that_seals_visitor_keys(tmp_path, monkeypatch):
    first = _page(tmp_path, monkeypatch).components["visitor"].secret
    after_restart = _page(tmp_path, monkeypatch).components["visitor"].secret
    assert first and first == after_restart
    elsewhere = _page(tmp_path / "other", monkeypatch).components["visitor"].secret
    assert elsewhere != first
    assert ((tmp_path / "visitors" / ".visitor-key-secret").stat().st_mode & 0o777) == 0o600


def test_a_flood_of_page_loads_never_evicts_a_visitor_with_files(tmp_path, monkeypatch, picture_dir):
    from tinv_gui.ui import app as app_module
    from tinv_gui.ui import dataset

    monkeypatch.setattr(app_module, "MAX_RETURNING", 5)
    app = _page(tmp_path, monkeypatch)
    victim = _Request("victim-session")
    key = app.welcome("", victim)[app.components["visitor"]]
    dataset.add_files(app.workspace(victim), [str(p) for p in picture_dir.iterdir()])
    for i in range(30):
        app.welcome("", _Request(f"flood-{i}"))
    assert app.workspace(victim).key == key and dataset.picture_paths(app.workspace(victim))
    assert len(app.returning) <= 6  # the table stays bounded: idle visitors are forgotten


# ----------------------------------------------------------------------------- 4: uploads
def test_uploads_are_bounded_refused_bytes_dropped_and_big_pictures_downscaled_once(tmp_path, monkeypatch):
    import io
    import zipfile

    from conftest import make_picture
    from PIL import Image

    from tinv_gui.ui import dataset
    from tinv_gui.ui.workspace import Workspaces

    monkeypatch.setattr(dataset, "MAX_UNPACKED_BYTES", 3 * 1024 * 1024)
    ws = Workspaces(tmp_path / "visitors").get("visitor-a")
    up = tmp_path / "uploads"
    up.mkdir()
    # A small zip that unpacks to far more than an upload may: members of 1 MB of zeros (compressed to ~1 kB).
    with zipfile.ZipFile(up / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(10):
            zf.writestr(f"junk{i}.png", b"\0" * (1024 * 1024))
    (up / "evil.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    big = make_picture(5, (3000, 2400))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    (up / "huge.jpg").write_bytes(buffer.getvalue())

    added = dataset.add_files(ws, [str(p) for p in sorted(up.iterdir())])

    problems = {p.name: p.problem for p in added if p.problem}
    assert sum("at most 3 MB" in why for why in problems.values()) == 7, problems  # 3 unpacked, 7 left packed
    assert "evil.svg" in problems
    stored = sum(f.stat().st_size for f in (tmp_path / "visitors").rglob("*") if f.is_file())
    assert stored < 2 * 1024 * 1024  # refused files keep their names and reasons, not their bytes
    assert not list(ws.rejected.glob("*.svg")) and not list(ws.rejected.glob("junk*"))
    listed = {p.name: p.problem for p in dataset.list_pictures(ws)}
    assert listed["evil.svg"] == problems["evil.svg"] and len(listed) == len(added)
    kept = dataset.picture_paths(ws)
    assert [p.name for p in kept] == ["huge.jpg"]
    with Image.open(kept[0]) as picture:
        assert min(picture.size) == dataset.MAX_SIDE and picture.size == (1280, 1024)


# ----------------------------------------------------------------------------- 3: serving
def test_visitor_files_outside_the_temp_folder_reach_only_their_visitor(app_server, tmp_path):
    """app_server keeps its visitors' folders outside the system's temporary folder."""
    import urllib.error
    import urllib.request

    from gradio_client import Client, handle_file

    url, visitors = app_server
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    examples = sorted((ROOT / "assets" / "examples").glob("*.png"))
    evil = tmp_path / "evil.svg"
    evil.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>')
    _, _, status, _ = client.predict([handle_file(str(p)) for p in [*examples, evil]], api_name="/add_pictures")
    assert "evil.svg" in status
    final = client.submit(model="demo", token="<far>", init="robot", preset="Quick", steps=5, batch_size=4, api_name="/train").result()
    downloads = {Path(p).name: Path(p) for p in final[4]}
    assert downloads["learned_embeds.safetensors"].stat().st_size > 0  # the visitor gets their files

    [embedding] = (visitors / client.session_hash).glob("runs/*/learned_embeds.safetensors")
    assert not list(visitors.rglob("*.svg"))  # a refused upload is not kept
    for path in (embedding, embedding.parent.parent.parent / "pictures" / examples[0].name):
        with pytest.raises(urllib.error.HTTPError) as refused:  # nobody gets them by naming their path
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10)
        assert refused.value.code in (403, 404)


# ----------------------------------------------------------------------------- 1, 5: the queue on a shared server
def test_a_job_past_the_time_limit_stops_and_keeps_what_it_saved():
    engine = Engine()
    engine.time_limit_s = 0.3

    def endless(reporter):
        while not reporter.should_stop():
            time.sleep(0.01)
        return {"embedding": "kept.safetensors"}

    job = engine.submit("endless", endless)
    event = job.wait()
    assert isinstance(event, Finished) and event.stopped_early and event.outputs
    assert any(isinstance(e, Log) and "at most 0.005 minutes" in e.message for e in job.history)
    engine.close()


def _shared_page(tmp_path, monkeypatch, picture_dir):
    from tinv_gui.ui import dataset

    monkeypatch.setenv("TINV_GUI_SHARED", "1")
    app = _page(tmp_path, monkeypatch)
    ws = app.workspaces.get("visitor-a")
    dataset.add_files(ws, [str(p) for p in picture_dir.iterdir()])
    return app, ws


def test_a_shared_server_caps_steps_and_stops_the_jobs_of_visitors_who_left(tmp_path, monkeypatch, picture_dir):
    import gradio as gr

    from tinv_gui.ui import tab_train

    app, ws = _shared_page(tmp_path, monkeypatch, picture_dir)
    assert app.engine.time_limit_s == 3600  # the default cap on a job's time
    with pytest.raises(gr.Error, match="at most 3000 steps"):
        app._submit_training(ws, "demo", "<x>", "toy", "Quick", [], {"steps": 5000})

    monkeypatch.setattr(tab_train, "LEFT_GRACE_S", 0.5)
    blocker = app.engine.submit("someone else's run", lambda r: time.sleep(3) or {})  # the visitor's run waits behind it
    following = app.start_training("demo", "<left>", "toy", "Quick", [], _Request("visitor-a"), steps=3000, batch_size=1)
    next(following)
    job = next(iter(app.jobs.values()))
    following.close()  # the visitor closed the page
    assert not job.done
    deadline = time.monotonic() + 60
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.cancelled and job.done
    blocker.wait()


def test_a_waiting_visitor_sees_their_place_and_the_expected_wait(tmp_path, monkeypatch, picture_dir):
    app, ws = _shared_page(tmp_path, monkeypatch, picture_dir)
    release = threading.Event()

    def running(reporter):  # another visitor's run: 10 steps at 1 s each, 5 done
        reporter.total_steps = 10
        for _ in range(5):
            reporter.step_started()
            reporter.step_finished(1.0, 0.1, "quick")
        release.wait(30)
        return {}

    app.engine.submit("someone else's run", running, total_steps=10)
    while not app.engine.current or not any(isinstance(e, Progress) for e in app.engine.current.history):
        time.sleep(0.05)
    following = app.start_training("demo", "<wait>", "toy", "Quick", [], _Request("visitor-a"), steps=20)
    shown = next(following)
    progress = shown[app.components["progress"]]
    release.set()
    following.close()
    assert "1 job(s) ahead of yours" in progress and "Expected wait: about" in progress, progress


# ----------------------------------------------------------------------------- 1: many generations from one visitor
@pytest.fixture
def shared_server(tmp_path, monkeypatch, store):
    """The app in shared mode, served in this process, with a visitor's limits set low: one call
    at once, two per ten minutes. Yields (url, app)."""
    from tinv_gui.ui.app import build_app
    from tinv_gui.ui.workspace import Workspaces

    for name, value in (("TINV_GUI_SHARED", "1"), ("TINV_GUI_VISITOR_AT_ONCE", "1"), ("TINV_GUI_VISITOR_CALLS", "2"),
                        ("TINV_GUI_VISITOR_WINDOW_MINUTES", "10")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(store, "hub_only", store.hub_only)  # the shared app sets it on the session's store
    page, app = build_app(engine=Engine(store), workspaces=Workspaces(tmp_path / "visitors"), hub=(False, "offline"))
    page.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield page.local_url, app
    finally:
        page.close()
        app.engine.close()


def test_one_visitor_cannot_hold_the_queue_with_many_generations(shared_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, app = shared_server
    release = threading.Event()
    app.engine.submit("someone else's run", lambda reporter: release.wait(60) and {})  # every call waits behind it
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    drawing = dict(model="demo", prompt="a red cube", steps=1, compare=False, api_name="/generate")
    try:
        burst = [alice.submit(**drawing) for _ in range(4)]
        deadline = time.monotonic() + 30
        while sum(call.done() for call in burst) < 3:  # the calls past her limit are refused at once, not queued
            assert time.monotonic() < deadline, "a visitor's burst of calls waits in the queue instead of being refused"
            time.sleep(0.1)
        bobs = bob.submit(**drawing)  # waits behind her one call only, and sees so
        while not any("2 job(s) ahead of yours" in (shown[2] or "") for shown in bobs.outputs()):
            assert time.monotonic() < deadline and not bobs.done(), bobs.outputs()
            time.sleep(0.1)
    finally:
        release.set()
    assert bobs.result()[0]
    answers = []
    for call in burst:
        try:
            answers.append(call.result()[0] and "drawn")
        except AppError as refused:
            answers.append(str(refused))
    assert answers.count("drawn") == 1, answers
    assert all("at most 1 at once from each visitor" in a and "Try again when one ends" in a for a in answers if a != "drawn")

    assert alice.predict(**drawing)[0]  # her calls one after another: two in ten minutes are fine...
    for endpoint, call in (("/generate", drawing), ("/measure", dict(model="demo", embedding="none", prompt="x", steps=1, seed=0))):
        with pytest.raises(AppError) as refused:  # ...a third is not, measuring included
            alice.predict(**{**call, "api_name": endpoint})
        assert "at most 2 generations, measurements and prompt searches from each visitor every 10 min" in str(refused.value)
        assert re.search(r"Try again in (9 min \d+ s|10 min)\.", str(refused.value)), str(refused.value)


def test_a_visitor_is_admitted_again_when_the_window_moves_and_idle_visitors_are_forgotten():
    import gradio as gr

    from tinv_gui.ui.limits import VisitorLimits

    now = [1000.0]
    limits = VisitorLimits(at_once=2, per_window=2, window_s=60, clock=lambda: now[0])
    limits.take("a")
    now[0] += 15
    limits.take("a")
    limits.release("a")
    limits.release("a")
    with pytest.raises(gr.Error, match=r"every 1 min\. Try again in 45 s\."):
        limits.take("a")
    now[0] += 45
    limits.take("a")  # the first call left the window
    limits.release("a")
    now[0] += 61
    limits.take("b")
    assert set(limits._started) == {"b"}  # "a" has nothing in flight and no call in the window


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_visitor_limit_that_is_no_positive_number_is_refused_naming_its_variable(monkeypatch, value):
    from tinv_gui.ui.limits import VisitorLimits

    monkeypatch.setenv("TINV_GUI_VISITOR_CALLS", value)
    with pytest.raises(ValueError, match=f"TINV_GUI_VISITOR_CALLS must be a whole number of 1 or more, not '{value}'"):
        VisitorLimits.from_env()


def test_a_generation_waiting_in_the_queue_shows_its_place_and_is_dropped_when_its_visitor_leaves(tmp_path, monkeypatch, picture_dir):
    app, ws = _shared_page(tmp_path, monkeypatch, picture_dir)
    release = threading.Event()
    app.engine.submit("someone else's run", lambda reporter: release.wait(30) and {})
    drawing = app.generate("demo", "none", "a red cube", "", 1, 7.5, 0, "Model default", "Model default", 1, 1.0, False, _Request("visitor-a"))
    _, _, waiting = next(drawing)
    assert "1 job(s) ahead of yours" in waiting, waiting
    drawing.close()  # the visitor closed the page
    release.set()
    app.engine.submit("the next job", lambda reporter: {}).wait()  # the queue has moved past the generation
    assert not list(ws.images.rglob("*.png"))  # it was never drawn
    app.engine.close()
