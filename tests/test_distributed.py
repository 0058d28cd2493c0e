"""Data-parallel training with two CPU processes under `accelerate launch`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinv_gui.distributed import ProcessInfo, shard

ROOT = Path(__file__).resolve().parent.parent


def test_shards_are_disjoint_and_cover_everything():
    items = list(range(5))
    parts = [shard(items, ProcessInfo(rank, 2)) for rank in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    assert shard(items, ProcessInfo(0, 1)) == items
    with pytest.raises(ValueError, match="at least 3"):
        shard([1, 2], ProcessInfo(0, 3))


def test_two_processes_see_different_pictures_and_the_result_loads(picture_dir, tmp_path, store):
    out = tmp_path / "out"
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The launcher of this Python's accelerate, PATH or not (an unactivated venv has no `accelerate` on PATH).
    # On CPUs accelerate forms a process group through torchrun (--multi_gpu); --cpu alone runs one process.
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "tinv_gui", "train", "--model", "demo",
         "--images", str(picture_dir), "--token", "<dp>", "--init", "toy", "--steps", "4", "--batch-size", "4",
         "--output", str(out), "--log-jsonl", str(log)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shares = dict(re.findall(r"process (\d)/2 trains on: ([^\n]+)", done.stderr))
    assert set(shares) == {"1", "2"}
    first, second = (set(shares[k].split(", ")) for k in ("1", "2"))
    assert first and second and not first & second
    assert first | second == {p.name for p in picture_dir.iterdir()}
    assert "effective batch size 8" in done.stderr
    assert len(log.read_text().splitlines()) == 4  # the main process alone writes the log

    pipe = store.pipeline("demo")
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    try:
        assert pipe.tokenizer.convert_tokens_to_ids("<dp>") == len(pipe.tokenizer) - 1
    finally:
        from tinv_gui.embeddings import unload_from_pipeline

        unload_from_pipeline(pipe, ["<dp>"])
