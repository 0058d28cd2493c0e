"""Bad input, faults and interruptions: clear messages, nothing the user made is lost."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tinv_gui import files
from tinv_gui.data import ImageError, open_image
from tinv_gui.embeddings import save_embedding
from tinv_gui.engine import Engine
from tinv_gui.events import Failed, Finished, Reporter
from tinv_gui.formats import read_embedding
from tinv_gui.training import LoopSettings, TrainingDiverged, optimize

ROOT = Path(__file__).resolve().parent.parent


def _seed_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(48 * 40 * 3) % 253).astype(np.uint8).reshape(40, 48, 3)).save(buffer, "PNG")
    return buffer.getvalue()


SEEDS = [_seed_png()]
for fmt in ("JPEG", "GIF", "BMP", "WEBP", "TIFF"):
    buf = io.BytesIO()
    Image.open(io.BytesIO(SEEDS[0])).convert("RGB").save(buf, fmt)
    SEEDS.append(buf.getvalue())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 10_000))
def test_picture_loader_fuzz_raises_only_its_own_error(tmp_path, seed, edits, cut):
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(cut, 1)]) if cut < len(data) else bytes(data)
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    try:
        image = open_image(path)
    except ImageError as error:
        assert "fuzz.img" in str(error)
    else:
        assert image.mode == "RGB"


def test_nan_loss_stops_and_restores_the_last_good_vectors():
    vectors = torch.zeros(1, 4, requires_grad=True)
    target = torch.ones(1, 4)

    def loss(step_holder=[0]):  # noqa: B006 - counts calls
        step_holder[0] += 1
        value = ((vectors - target) ** 2).sum()
        return value * float("nan") if step_holder[0] == 4 else value

    after_step = {}

    def remember(step, _optimizer):
        after_step[step] = vectors.detach().clone()

    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        optimize(vectors, lambda _m: loss(), LoopSettings(steps=10, lr=0.1), Reporter(total_steps=10), on_step=remember)
    assert sorted(after_step) == [1, 2, 3]  # step 4's loss was NaN
    assert torch.equal(vectors.detach(), after_step[3])  # the vectors after the three good steps, not zeros nor NaN
    assert not torch.equal(after_step[3], after_step[2])


def test_out_of_memory_ends_the_job_with_advice_and_the_engine_goes_on():
    engine = Engine()

    def work(reporter):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    event = engine.submit("oom", work).wait()
    assert isinstance(event, Failed) and "smaller batch" in event.message and "gradient checkpointing" in event.message
    assert isinstance(engine.submit("next", lambda r: {"ok": "yes"}).wait(), Finished)


def test_a_crash_while_saving_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "learned_embeds.safetensors"
    good = torch.randn(1, 8)
    save_embedding(path, "<t>", good)

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken_save)
    with pytest.raises(OSError):
        save_embedding(path, "<t>", torch.randn(1, 8))
    assert torch.equal(read_embedding(path).vectors, good)
    assert [p.name for p in tmp_path.iterdir()] == ["learned_embeds.safetensors"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_cli_saves_the_embedding(picture_dir, tmp_path, sig):
    out = tmp_path / "out"
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinv_gui", "train", "--model", "demo", "--images", str(picture_dir), "--token", "<int>",
         "--init", "toy", "--steps", "100000", "--batch-size", "4", "--output", str(out), "--log-jsonl", str(log)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.2)
    assert log.exists(), proc.stderr.read() if proc.poll() is not None else "no progress within the time limit"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr  # stopped early: not the status of a finished run
    assert f"stopped early by {signal.Signals(sig).name}; the embedding so far was saved" in stderr
    read = read_embedding(out / "learned_embeds.safetensors")
    token, vectors = read.token, read.vectors
    assert token == "<int>" and torch.isfinite(vectors).all()


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16"])
def test_odd_modes_train(store, tmp_path, mode):
    from tinv_gui.settings import TrainSettings

    folder = tmp_path / "odd"
    folder.mkdir()
    for i in range(2):
        array = (np.random.RandomState(i).rand(70, 90, 3) * 255).astype(np.uint8)
        image = Image.fromarray(array)
        if mode == "I;16":
            image = Image.fromarray(array[..., 0].astype(np.uint16) * 257)
        else:
            image = image.convert(mode)
        image.save(folder / (f"{i}.tiff" if mode in ("CMYK", "I;16") else f"{i}.png"))
    engine = Engine(store)
    event = engine.train(TrainSettings(images=folder, token="<odd>", init="toy", steps=2, batch_size=2,
                                       output_dir=str(tmp_path / "o"), method="quick")).wait()
    assert isinstance(event, Finished), getattr(event, "message", "")
