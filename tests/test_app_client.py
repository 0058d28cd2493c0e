"""The app's functions through gradio_client, against `python app.py` on a local port, offline,
with the demo model: upload, train while following the progress, stop, download, generate, and
two visitors who never see each other's files."""

import json
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tinv_gui.formats import EmbeddingFile, read_embedding, write_embedding

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "assets" / "examples").glob("*.png"))
STEPS = 60  # the first run's: enough for its loss to fall and for the page to follow it as it goes


def visitor(url: str) -> Client:
    """A new visitor: gradio_client opens its own session, as a new browser tab would."""
    return Client(url, verbose=False, download_files=True)


def _train(client: Client, **overrides):
    args = dict(model="demo", token="<toy-robot>", init="robot", preset="Quick", steps=20, batch_size=8)
    return client.submit(**{**args, **overrides}, api_name="/train")


def _wait_until_training(job, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any("Training: step" in update[0] for update in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), job.outputs()[-1:]
        time.sleep(0.2)


def test_page_is_served_on_the_configured_port_and_explains_itself(app_server):
    import urllib.request

    url, _ = app_server
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    config = urllib.request.urlopen(url + "config", timeout=10).read().decode()
    assert json.loads(config)["title"] == "tinv-gui" and "<gradio-app" in page
    assert "teach Stable Diffusion a new word" in config and "cannot be downloaded right now" in config


def test_upload_train_follow_download_generate(app_server, tmp_path):
    url, _ = app_server
    client = visitor(url)
    gallery, table, status, _ = client.predict([handle_file(str(p)) for p in EXAMPLES], api_name="/add_pictures")
    assert len(gallery) == 4 and "4 picture(s) ready" in status
    assert [row[0] for row in table["data"]] == [p.name for p in EXAMPLES]

    job = _train(client, steps=STEPS, batch_size=4)  # seconds long, so the page is seen following it
    summaries = [update[0] for update in job]
    final = job.result()
    # The page followed the run while it went, not only at the end.
    assert any("Training: step" in s for s in summaries), summaries[:5]
    assert f"Done: step {STEPS} / {STEPS}" in final[0]
    curves = {}
    plot = final[1].get("value", final[1])  # an update: the frame, and colours for its curves
    assert set(final[1].get("color_map") or {}) == {"quick (raw)", "quick (smoothed)"}, final[1].keys()
    steps = {}
    for step, loss, curve, _phase in plot["data"]:
        curves.setdefault(curve, []).append(loss)
        steps.setdefault(curve, []).append(step)
    assert set(curves) == {"quick (raw)", "quick (smoothed)"}
    # A run this short reaches the page whole, every step of it (test_ui_parts: a long one is thinned).
    assert steps == {"quick (raw)": list(range(1, STEPS + 1)), "quick (smoothed)": list(range(1, STEPS + 1))}
    raw = curves["quick (raw)"]
    # The loss fell, clearly: vectors that do not learn (a learning rate of ~0) end within 2% of
    # where they began, these at ~0.78 of it after 60 steps.
    assert sum(raw[-20:]) / 20 < 0.9 * sum(raw[:5]) / 5, raw
    assert "Finished." in final[3]

    downloads = {Path(p).name: p for p in final[4]}  # every format, each said what it is for
    assert set(downloads) == {
        "learned_embeds.safetensors", "learned_embeds.bin", "toy-robot.pt", "toy-robot.safetensors", "toy-robot.png", "toy-robot-onetrainer.safetensors"
    }
    for name, path in downloads.items():
        read = read_embedding(path)
        token, vectors = read.token, read.vectors  # the name each tool types: diffusers the token, the others the file's name
        assert token == ("<toy-robot>" if name.startswith("learned_embeds") else Path(name).stem) and tuple(vectors.shape) == (1, 64)
    assert all(tool in final[5] for tool in ("kohya", "AUTOMATIC1111", "InvokeAI", "OneTrainer", "type `toy-robot`"))

    embedding = final[6]["value"]  # the Playground's choice now points at the new embedding
    assert embedding.endswith("learned_embeds.safetensors")
    with_it, without, note = client.predict(
        model="demo", embedding=embedding, prompt="a photo of <toy-robot>", steps=2, compare=True, api_name="/generate"
    )
    assert len(with_it) == 1 and len(without) == 1 and "Seed 0." in note

    with pytest.raises(AppError, match="QuickEmbedding runs start afresh"):
        _train(client, resume=embedding).result()
    resumed = _train(client, preset="Thorough", steps=STEPS + 2, batch_size=1, resume=embedding).result()  # named as the Playground lists it
    assert f"Done: step {STEPS + 2} / {STEPS + 2}" in resumed[0], resumed[0]
    from PIL import Image

    assert Image.open(with_it[0]["image"]).tobytes() != Image.open(without[0]["image"]).tobytes()

    scores = client.predict(model="demo", embedding=embedding, prompt="a photo of <toy-robot>", steps=1, guidance=3, api_name="/measure")
    assert "| with `<toy-robot>` | 0." in scores or "| with `<toy-robot>` | -0." in scores, scores
    assert "guidance 3:" in scores, scores  # measured at the Playground's slider, not the model's default


def test_stop_ends_the_run_and_keeps_the_embedding(app_server):
    url, _ = app_server
    client = visitor(url)
    client.predict(api_name="/add_examples")
    job = _train(client, steps=100_000, token="<stopped>")
    _wait_until_training(job)
    assert "Stopping" in client.predict(api_name="/stop")
    final = job.result()
    assert final[0].startswith('<div class="tinv-progress">') and "Stopped: step" in final[0]
    assert read_embedding(final[4][0]).token == "<stopped>"  # the diffusers file comes first


def test_two_visitors_never_see_each_others_files(app_server):
    url, visitors = app_server
    alice, bob = visitor(url), visitor(url)
    alice.predict(api_name="/add_examples")
    bob_gallery, _, bob_status, _ = bob.predict([handle_file(str(EXAMPLES[0]))], api_name="/add_pictures")
    assert len(bob_gallery) == 1 and "1 picture(s) ready" in bob_status

    # Alice trains a long run; Bob's training waits in the queue (one training at a time), and
    # his page says so, with his place in it.
    alice_job = _train(alice, steps=100_000, token="<alice-secret>")
    _wait_until_training(alice_job)
    assert "Nothing is training" in bob.predict(api_name="/stop")  # Bob cannot stop Alice's run
    bob_job = _train(bob, steps=5, token="<bob-thing>")
    deadline = time.monotonic() + 60
    while not any("1 job(s) ahead of yours" in update[0] for update in bob_job.outputs()):
        assert time.monotonic() < deadline and not bob_job.done(), bob_job.outputs()[-1:]
        time.sleep(0.2)
    assert not alice_job.done()
    alice.predict(api_name="/stop")
    alice_final, bob_final = alice_job.result(), bob_job.result()
    assert "Stopped" in alice_final[0] and "Done: step 5 / 5" in bob_final[0]

    alice_files = {p.name for p in (visitors / alice.session_hash).rglob("*") if p.is_file()}
    bob_files = {p.name for p in (visitors / bob.session_hash).rglob("*") if p.is_file()}
    assert "toy-robot-2.png" in alice_files and "toy-robot-2.png" not in bob_files

    bob_choices = [value for _, value in bob.predict(current="none", api_name="/embeddings")["choices"]]
    assert len(bob_choices) == 2 and all("alice" not in value for value in bob_choices)
    alice_embedding = alice_final[6]["value"]
    for attempt in (alice_embedding, f"../{alice.session_hash}/{alice_embedding}", str(visitors / alice.session_hash / alice_embedding)):
        with pytest.raises(AppError, match="not one of your files|not in the list of choices"):
            bob.predict(model="demo", embedding=attempt, prompt="a photo of <alice-secret>", steps=1, api_name="/generate")


def test_mistakes_get_plain_answers(app_server, tmp_path):
    url, _ = app_server
    client = visitor(url)
    with pytest.raises(AppError, match="no pictures"):
        _train(client).result()
    (tmp_path / "broken.png").write_bytes(b"not a picture at all")
    gallery, _, status, _ = client.predict([handle_file(str(tmp_path / "broken.png")), handle_file(str(EXAMPLES[1]))], api_name="/add_pictures")
    assert "1 refused" in status.lower() or "Refused 1" in status
    assert any((item["caption"] or "").startswith("✗ broken.png: not a picture") for item in gallery)
    with pytest.raises(AppError, match="already a word"):
        _train(client, token="cat").result()
    for elsewhere in ("/etc/passwd", "../../outside.safetensors", "runs/none.safetensors"):  # only the visitor's own files
        with pytest.raises(AppError, match="not one of your embeddings"):
            _train(client, resume=elsewhere).result()


def test_playground_loads_embedding_files_of_other_tools(app_server, tmp_path):
    import torch
    from safetensors.torch import save_file

    url, _ = app_server
    client = visitor(url)
    save_file({"emb_params": torch.randn(2, 64) * 0.3}, tmp_path / "kohya-style.safetensors")
    choice, message = client.predict([handle_file(str(tmp_path / "kohya-style.safetensors"))], api_name="/load_embedding")
    assert "Loaded `kohya-style` from kohya-style.safetensors (2 vector(s) of width 64). Type `kohya-style`" in message
    with_it, without, _ = client.predict(
        model="demo", embedding=choice["value"], prompt="a photo of kohya-style", steps=1, compare=False, api_name="/generate"
    )
    assert len(with_it) == 1 and not without
    card, card_message = client.predict(embedding=choice["value"], api_name="/save_card")  # with the picture just drawn inside
    assert Path(card).name == "kohya-style.png" and "type `kohya-style`" in card_message
    back = read_embedding(card)
    assert back.token == "kohya-style" and back.layout == "a1111-png" and back.vectors.shape == (2, 64)

    # An A1111 name that is an ordinary word, and diffusers' SDXL output as its two files at once.
    write_embedding(EmbeddingFile("x", torch.randn(2, 64)), tmp_path / "fresh.pt", "a1111-pt")
    choice, message = client.predict([handle_file(str(tmp_path / "fresh.pt"))], api_name="/load_embedding")
    assert "Type `fresh` in your prompt" in message
    _, _, note = client.predict(model="demo", embedding=choice["value"], prompt="a Fresh apple", steps=1, compare=False, api_name="/generate")
    assert "does not contain" not in note
    xl = write_embedding(EmbeddingFile("<xl>", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}), tmp_path / "xl" / "learned_embeds.safetensors", "diffusers")
    _, message = client.predict([handle_file(str(xl)), handle_file(str(xl.with_name("learned_embeds_2.safetensors")))], api_name="/load_embedding")
    assert "Loaded `<xl>` from learned_embeds.safetensors + learned_embeds_2.safetensors (2 vector(s) of widths 32 + 64)" in message

    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "sd15-made.safetensors")
    choice, _ = client.predict([handle_file(str(tmp_path / "sd15-made.safetensors"))], api_name="/load_embedding")
    with pytest.raises(AppError, match="width 768"):
        client.predict(model="demo", embedding=choice["value"], prompt="a photo of <sd15-made>", steps=1, api_name="/generate")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(AppError, match="Not an embedding file this app can read: junk.safetensors is neither"):
        client.predict([handle_file(str(tmp_path / "junk.safetensors"))], api_name="/load_embedding")


def test_prompt_from_image_finds_words_and_draws_them(app_server):
    url, _ = app_server
    client = visitor(url)
    job = client.submit(model="demo", image=handle_file(str(EXAMPLES[0])), readable=True, steps=6, api_name="/find_prompt")
    progress, plot, prompt = job.result()
    assert "Best CLIP similarity with the picture" in progress and len(plot["data"]) == 6
    assert prompt and not prompt.startswith("(")  # readable words
    (picture,) = client.predict(model="demo", steps=2, api_name="/generate_found")
    assert Path(picture["image"]).is_file()

    _, _, prompt = client.predict(model="demo", image=handle_file(str(EXAMPLES[1])), readable=False, steps=3, api_name="/find_prompt")
    assert "continuous prompt" in prompt
    assert len(client.predict(model="demo", steps=2, api_name="/generate_found")) == 1  # drawn from its prompt_embeds

    # SDXL too: its continuous prompt carries both text encoders' conditioning and the pooled one.
    _, _, prompt = client.predict(model="demo-sdxl", image=handle_file(str(EXAMPLES[2])), readable=False, steps=3, api_name="/find_prompt")
    assert "continuous prompt" in prompt
    (picture,) = client.predict(model="demo-sdxl", steps=2, api_name="/generate_found")
    assert Path(picture["image"]).is_file()


def test_sd3_trains_in_the_app_and_its_download_holds_a_part_per_text_encoder(app_server):
    """SD 3.x through the app on demo-sd3: textual inversion, the downloads (ours and OneTrainer's,
    which ComfyUI reads) with each text encoder's part at its width, and the Playground drawing
    with the new word."""
    from PIL import Image

    from tinv_gui.demo_sd3_flux import SD3_TEXT_WIDTHS
    from tinv_gui.families import StableDiffusion3

    url, _ = app_server
    client = visitor(url)
    client.predict(api_name="/add_examples")
    final = _train(client, model="demo-sd3", token="<sd3-robot>", preset="Thorough", steps=2, batch_size=1, grad_accum=1, resolution=64).result()
    assert "Done: step 2 / 2" in final[0], final[0]
    downloads = {Path(p).name: p for p in final[4]}
    assert set(downloads) == {"learned_embeds.safetensors", "sd3-robot.safetensors"}  # no A1111, kohya or InvokeAI file for SD 3.x
    for name, path in downloads.items():
        back = read_embedding(path)
        assert back.keys == StableDiffusion3.embedding_keys and back.widths == SD3_TEXT_WIDTHS and back.count == 1, name
        assert [f.name for f in back.families] == ["sd3"] and back.step == 2, name
    assert "ComfyUI: type `embedding:sd3-robot`" in final[5]

    embedding = final[6]["value"]
    with_it, without, _ = client.predict(
        model="demo-sd3", embedding=embedding, prompt="a photo of <sd3-robot>", steps=1, compare=True, api_name="/generate"
    )
    assert Image.open(with_it[0]["image"]).tobytes() != Image.open(without[0]["image"]).tobytes()
