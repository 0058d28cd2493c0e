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
    assert clip.image_size == 64 and store.text_width("demo") == 64


def test_placement_choices():
    cpu = choose_placement("cpu", "fp32")
    assert cpu.device == torch.device("cpu") and cpu.autocast_dtype is None
    assert choose_placement("cpu", "bf16").autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        choose_placement("cpu", "fp16")
    with pytest.raises(ValueError, match="precision"):
        choose_placement("cpu", "fp64")
