"""A real browser clicks through the page: upload, train, watch the loss plot and the vectors'
lengths, see the checkpoints scored, download the recommended one, and a Playground picture. Debian's chromium, driven by Playwright (Playwright's own browser download
does not work offline). Screenshots go to TINV_GUI_SCREENSHOTS, or a temporary folder."""

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TINV_GUI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "assets" / "examples").glob("*.png"))

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM),
    reason=f"no chromium at {CHROMIUM}: install it (apt-get install -y chromium) or set TINV_GUI_CHROMIUM",
)


@pytest.fixture
def browser_page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        finally:
            browser.close()


def test_a_person_clicks_through_train_and_try(app_server, browser_page, tmp_path):
    from tinv_gui.formats import read_embedding

    url, _ = app_server
    shots = Path(os.environ.get("TINV_GUI_SCREENSHOTS") or tempfile.mkdtemp(prefix="tinv-gui-screens-"))
    shots.mkdir(parents=True, exist_ok=True)
    page = browser_page
    page.set_default_timeout(120_000)

    page.goto(url)
    page.get_by_text("No pictures yet.").wait_for()
    assert page.title() == "tinv-gui"
    assert page.get_by_role("heading", name="tinv-gui: teach Stable Diffusion a new word").is_visible()
    assert page.get_by_text("cannot be downloaded right now").is_visible()  # offline: says so, offers the demo

    page.locator("input[type=file]").first.set_input_files([str(p) for p in EXAMPLES])
    page.get_by_text("4 picture(s) ready").wait_for()
    page.screenshot(path=shots / "1-dataset.png", full_page=True)

    page.get_by_role("tab", name="2. Method").click()
    page.get_by_label("New word (token)").fill("<toy-robot>")
    page.get_by_label("Starting word").fill("robot")
    page.get_by_text("Advanced: every training option").click()
    page.locator("#option-steps input").fill("120")  # long enough (seconds) that the page is seen following it
    page.locator("#option-batch_size input").fill("4")
    page.locator("#option-batch_size input").press("Tab")
    assert page.locator("#token-room").get_by_text("the word takes 1 of a prompt's 75 tokens").is_visible()
    page.locator("#option-save_every input").fill("40")  # three checkpoints, scored when the run ends
    page.locator("#option-preview_steps input").fill("1")
    page.locator("#option-preview_steps input").press("Tab")
    page.locator("#option-score_checkpoints input").click()
    page.get_by_role("option", name="after", exact=True).click()
    page.screenshot(path=shots / "2-method.png", full_page=True)

    page.get_by_role("tab", name="3. Train").click()
    page.get_by_role("button", name="Start training").click()
    page.get_by_text("Training: step").wait_for()  # the page follows the run as it goes
    page.get_by_text("Done: step 120 / 120").wait_for(timeout=600_000)  # then three checkpoints draw and are scored
    plot = page.locator("#loss-plot .vega-embed")
    plot.wait_for()
    page.screenshot(path=shots / "3-train.png", full_page=True)
    lines = plot.locator("g.mark-line path")
    assert lines.count() == 2 and all(lines.nth(i).get_attribute("stroke") not in (None, "", "none") for i in range(2))
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", plot.inner_html())
    numbers = [t for t in labels if t.replace(".", "", 1).isdigit()]
    assert len(numbers) >= 5 and len(labels) < 80, labels[:20]  # numeric axes, not one category per step

    # Is it overcooked: each vector's length beside the band of the model's own words (three lines).
    assert page.locator("#norm-plot g.mark-line path").count() == 3
    # Which step to keep: likeness and editability over the checkpoints, the recommended one named
    # and offered first in the downloads.
    page.locator("#score-text").get_by_text("Recommended checkpoint: step").wait_for()
    assert page.locator("#score-plot g.mark-line path").count() == 2
    recommended = re.search(r"Recommended checkpoint: step (\d+)", page.locator("#score-text").inner_text()).group(1)
    page.locator("#score-plot").scroll_into_view_if_needed()
    page.screenshot(path=shots / "3b-scores.png", full_page=True)
    with page.expect_download() as download:
        page.locator("#downloads a[data-testid=download-link]").first.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    last = recommended == "120"  # the final embedding itself, then (listed once, labelled recommended)
    assert saved.name == ("learned_embeds.safetensors" if last else f"learned_embeds-step{int(recommended):05d}.safetensors")
    assert read_embedding(saved).token == "<toy-robot>"

    page.get_by_role("button", name="Try it in the Playground").click()
    assert page.locator("#playground-prompt").get_by_role("textbox").input_value() == "a photo of <toy-robot>"
    assert f"{recommended} steps, the recommended checkpoint" in page.get_by_label("Embedding", exact=True).input_value()
    page.locator("#gen-steps input[type=number]").fill("3")
    page.locator("#gen-steps input[type=number]").press("Tab")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("Seed 0.").wait_for()
    assert page.locator("#playground-with img").count() >= 1 and page.locator("#playground-without img").count() >= 1
    page.screenshot(path=shots / "4-playground.png", full_page=True)

    # Leaving and coming back does not lose anything: the browser keeps the visitor's key.
    page.reload()
    page.get_by_text("4 picture(s) ready").wait_for()
    page.get_by_role("tab", name="3. Train").click()
    page.get_by_text("Done: step 120 / 120").wait_for()
    # the recommended checkpoint (unless it is the embedding), the embedding, diffusers .bin, A1111 .pt, kohya, A1111 card, OneTrainer
    assert page.locator("#downloads a[data-testid=download-link]").count() == (6 if last else 7)
    print(f"screenshots in {shots}")
