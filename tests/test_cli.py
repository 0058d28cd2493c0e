"""End to end through the command line, as a user runs it, through the same cli.main that
`python -m tinv_gui` calls, in this process. `python -m tinv_gui train` as a process of its own,
its exit statuses and signals, is in test_distributed, test_robustness and test_hardening."""

import json
from pathlib import Path

import torch
from conftest import cli_here


def test_quick_training_through_the_cli_loads_in_diffusers(picture_dir, tmp_path, store, capsys):
    out = tmp_path / "out"
    log = tmp_path / "log.jsonl"
    done = cli_here(capsys, "train", "--method", "quick", "--model", "demo", "--images", str(picture_dir), "--token", "<cli-toy>",
                   "--init", "toy", "--steps", "12", "--batch-size", "8", "--output", str(out), "--log-jsonl", str(log),
                   "--save-every", "6", "--score-checkpoints", "after", "--preview-steps", "1")
    assert done.returncode == 0, done.stderr
    # The checkpoints' scores: a table on the terminal, the same figures in the run's JSON.
    result = json.loads((out / "result.json").read_text())
    scored = result["checkpoint_scores"]["checkpoints"]
    assert [c["step"] for c in scored] == [6, 12] and f"result: {out / 'result.json'}" in done.stdout
    for c in scored:
        assert f"{c['step']:>8}  {c['likeness']:>9.4f}  {c['editability']:>11.4f}  {Path(c['path']).name}" in done.stderr
    assert f"recommended: {result['checkpoint_scores']['recommended']['path']}" in done.stdout
    assert len(result["vector_norms"]["curve"]) == 12 and result["prompt_tokens"]["used"] == 1
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "lr", "elapsed_s", "phase"} <= rows[0].keys()
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = out / "learned_embeds.safetensors"
    assert str(saved) in done.stdout

    from safetensors.torch import load_file

    from tinv_gui.embeddings import unload_from_pipeline

    vector = load_file(str(saved))["<cli-toy>"]
    pipe = store.pipeline("demo")
    pipe.load_textual_inversion(str(saved))
    try:
        token_id = pipe.tokenizer.convert_tokens_to_ids("<cli-toy>")
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vector[0])
    finally:
        unload_from_pipeline(pipe, ["<cli-toy>"])


def test_bad_input_exits_non_zero_with_one_clear_line(tmp_path, capsys):
    done = cli_here(capsys, "train", "--images", str(tmp_path), "--token", "<x>", "--output", str(tmp_path / "o"), "--steps", "2")
    assert done.returncode != 0
    assert "error: no pictures" in done.stderr and "Traceback" not in done.stderr
    done = cli_here(capsys, "train", "--images", str(tmp_path), "--token", "<x>", "--output", str(tmp_path / "o"), "--steps", "-3")
    assert done.returncode != 0 and "steps" in done.stderr and "Traceback" not in done.stderr


def test_demo_model_command_writes_both_folders(tmp_path, capsys):
    done = cli_here(capsys, "demo-model", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo" / "sd" / "model_index.json").exists()
    assert (tmp_path / "demo" / "clip" / "config.json").exists()
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "demo" / "sd")
    clip = CLIPModel.from_pretrained(tmp_path / "demo" / "clip")
    text = pipe.text_encoder.state_dict()
    assert all(torch.equal(v, clip.text_model.state_dict()[k]) for k, v in text.items())
    assert pipe.tokenizer.model_max_length == 77
