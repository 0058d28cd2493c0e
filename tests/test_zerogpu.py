"""On a ZeroGPU Space every GPU call runs in a fork of the server that holds the GPU only while
the call lasts. With tests/zerogpu_stub in place of the `spaces` package, the app must train,
stop and generate entirely inside those calls."""

from pathlib import Path

from gradio_client import Client, handle_file

from tinv_gui.formats import read_embedding
from tinv_gui.ui.tab_train import training_duration

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "assets" / "examples").glob("*.png"))


def _visitor_with_pictures(url: str) -> Client:
    client = Client(url, verbose=False, download_files=True)
    *_, status, _ = client.predict([handle_file(str(p)) for p in EXAMPLES], api_name="/add_pictures")
    assert "4 picture(s) ready" in status
    return client


def test_training_and_generation_run_inside_gpu_calls(zerogpu_app_server):
    url, _, calls = zerogpu_app_server
    client = _visitor_with_pictures(url)
    job = client.submit(model="demo", token="<zero>", init="robot", preset="Quick", steps=200, batch_size=4, api_name="/train")
    final = job.result(timeout=240)  # without a job thread in the GPU process, it never ends
    updates = [update[0] for update in job.outputs()]
    assert any("Training: step" in u for u in updates)  # followed while it ran, across the process boundary
    assert "Done: step 200 / 200" in final[0], final[0]
    downloads = {Path(p).name: p for p in final[4]}
    assert "learned_embeds.safetensors" in downloads
    assert read_embedding(downloads["learned_embeds.safetensors"]).token == "<zero>"

    with_it, without, note = client.predict(
        model="demo", embedding=final[6]["value"], prompt="a photo of <zero>", steps=2, compare=True, api_name="/generate"
    )
    assert len(with_it) == 1 and len(without) == 1 and "Seed 0." in note

    asked = dict(line.split() for line in calls.read_text().splitlines())
    # A duration worked out from the run's settings (its steps), not on_gpu's default of 120 s.
    expected = training_duration("demo", "<zero>", "robot", "Quick", None, steps=200, batch_size=4)
    assert float(asked["start_training"]) == expected and 120 < expected <= 1500
    assert "generate" in asked


def test_stop_reaches_the_job_in_the_gpu_process(zerogpu_app_server):
    import time

    url, _, _ = zerogpu_app_server
    client = _visitor_with_pictures(url)
    job = client.submit(model="demo", token="<zero-stop>", init="robot", preset="Quick", steps=100_000, batch_size=4, api_name="/train")
    deadline = time.monotonic() + 120
    while not any("Training: step" in update[0] for update in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), job.outputs()[-1:]
        time.sleep(0.2)
    assert "Stopping" in client.predict(api_name="/stop")  # this handler runs in the server, the job does not
    final = job.result(timeout=120)
    assert "Stopped: step" in final[0], final[0]
    assert read_embedding(final[4][0]).token == "<zero-stop>"  # the embedding so far was saved
