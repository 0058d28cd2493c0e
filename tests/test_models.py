"""Model loading: sources, warm reuse, device choice, clear errors."""

import pytest
import torch

from tinv_gui.device import choose_placement
from tinv_gui.models import ModelLoadError, ModelStore, resolve_source


def test_sources_are_told_apart(tmp_path):
    assert resolve_source("demo").kind == "folder"
    assert resolve_source("owner/model").kind == "hub"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_source(str(tmp_path / "model.safetensors")).kind == "file"
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.ckpt"))


def test_offline_hub_model_gets_an_actionable_message():
    with pytest.raises(ModelLoadError) as error:
        ModelStore().pipeline("someone/not-a-cached-model")
    assert "demo" in str(error.value) and "Hub" in str(error.value)


def test_pipeline_and_clip_load_once(store):
    pipe = store.pipeline("demo")
    loads = store.loads
    assert store.pipeline("demo") is pipe and store.loads == loads
    clip = store.clip("demo")
    assert store.clip("demo") is clip
    assert clip.image_size == 64 and store.text_widths("demo") == (64,)


def test_placement_choices():
    cpu = choose_placement("cpu", "fp32")
    assert cpu.device == torch.device("cpu") and cpu.autocast_dtype is None
    assert choose_placement("cpu", "bf16").autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        choose_placement("cpu", "fp16")
    with pytest.raises(ValueError, match="precision"):
        choose_placement("cpu", "fp64")


def test_downloads_into_the_hub_cache_are_reported_while_loading(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from tinv_gui.models import reporting_downloads

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    blobs = tmp_path / "models--owner--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "old").write_bytes(b"x" * 1000)  # already there: not counted as downloaded
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    quiet, said = [], []
    with reporting_downloads(quiet.append, every_s=0.02):
        time.sleep(0.15)  # nothing arrives: nothing is said
    with reporting_downloads(said.append, every_s=0.02):
        with open(blobs / "new.incomplete", "wb") as part:
            for _ in range(3):
                part.write(b"y" * 5_000_000)
                part.flush()
                time.sleep(0.1)
    assert quiet == []
    import re

    amounts = [int(re.match(r"Downloading the model: (\d+) MB so far \(\d+ MB/s\)$", line).group(1)) for line in said]
    assert amounts and amounts == sorted(amounts) and 10 <= amounts[-1] <= 15, said  # writes may be seen mid-way
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with reporting_downloads(quiet.append, every_s=0.02):
        (blobs / "offline").write_bytes(b"z" * 1000)
        time.sleep(0.1)
    assert quiet == []
