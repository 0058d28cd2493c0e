"""Shared fixtures. Tests run offline on the demo model, built once per test session."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: never touch the network, and keep the demo model
# in a folder of this session's own (or in TINV_GUI_HOME when the caller set one to reuse).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TINV_GUI_HOME", tempfile.mkdtemp(prefix="tinv-gui-tests-"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def make_picture(seed: int, size=(96, 80)) -> Image.Image:
    """A picture with some structure (a coloured disc and a bar on a gradient), unlike noise."""
    rng = np.random.RandomState(seed)
    w, h = size
    gradient = np.linspace(0, 1, w)[None, :, None] * rng.rand(1, 1, 3) * 255
    base = np.broadcast_to(gradient, (h, w, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(base))
    draw = ImageDraw.Draw(image)
    r = min(w, h) // 4
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    draw.rectangle((0, h - h // 6, w, h), fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    return image


def cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """`python -m tinv_gui ARGS` run in this process, through the same cli.main that __main__
    calls: its exit status and what it printed. A subprocess costs seconds of imports each
    time; the tests of the process itself (signals, the exit of a failed job) keep theirs."""
    from tinv_gui import cli

    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:  # argparse refusing a flag ends the process
        code = exit.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "tinv_gui", *args], code, out, err)


@pytest.fixture
def picture_dir(tmp_path) -> Path:
    """A folder of four small structured pictures."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(4):
        make_picture(i).save(folder / f"picture{i}.png")
    return folder


@pytest.fixture(scope="session")
def store():
    """One ModelStore for the whole session, so the demo model loads once."""
    from tinv_gui.models import ModelStore

    return ModelStore()


def _serve_app(tmp_path_factory, **env):
    """`python app.py` on a free local port (GRADIO_SERVER_PORT), offline, with its visitors'
    folders in a temporary folder of its own, and `env` added. Yields (url, visitors folder)."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    visitors = tmp_path_factory.mktemp("visitors")
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), TINV_GUI_VISITORS=str(visitors), GRADIO_ANALYTICS_ENABLED="False", **env)
    root = Path(__file__).resolve().parent.parent
    log = open(tmp_path_factory.mktemp("app-log") / "app.log", "w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url, visitors
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The app as `python app.py` runs it on a server: (url, visitors folder). Its visitors'
    folders lie outside the system's temporary folder (as with TINV_GUI_VISITORS=/srv/visitors):
    the app's TMPDIR is a folder of its own, so their files reach the page through the hand-out
    copies (Workspace.served). The ZeroGPU server below keeps them inside it, the default."""
    yield from _serve_app(tmp_path_factory, TMPDIR=str(tmp_path_factory.mktemp("server-temp")))


@pytest.fixture(scope="module")
def zerogpu_app_server(tmp_path_factory):
    """The app as on a ZeroGPU Space, with tests/zerogpu_stub standing in for the `spaces`
    package: (url, visitors folder, file listing each GPU call and the seconds it asked for)."""
    calls = tmp_path_factory.mktemp("zerogpu") / "calls.log"
    stub = Path(__file__).resolve().parent / "zerogpu_stub"
    path = os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))
    for url, visitors in _serve_app(tmp_path_factory, SPACES_ZERO_GPU="true", PYTHONPATH=path, ZEROGPU_STUB_LOG=str(calls)):
        yield url, visitors, calls
