"""Load test: several visitors use the app at once, as on a shared Space, for a few minutes.

Starts `python app.py` in shared mode (TINV_GUI_SHARED=1) on a free local port with the demo
model, offline, and runs one thread per visitor through gradio_client, each looping: reload the
page, upload pictures, train (QuickEmbedding), generate with the embedding, measure it, start a
short textual inversion and stop it. Counts every request and every failure (an answer the
visitor did not expect, or an error), samples the server's resident memory each second, and
prints the figures with the CPU, the precision and the machine's load (other jobs share it).

Run: `HF_HUB_OFFLINE=1 python benchmarks/load_test.py [--visitors 3] [--minutes 3]`
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.png"))
sys.path.insert(0, str(ROOT))


def rss_of(pid: int) -> int:
    """Resident bytes of process `pid` now."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def serve(visitors_dir: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python app.py` in shared mode on a free port; returns (process, url) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), TINV_GUI_VISITORS=visitors_dir, TINV_GUI_SHARED="1",
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Tally:
    """Requests and failures of every visitor, by kind; thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.failures: list[str] = []

    def request(self, kind: str) -> None:
        with self.lock:
            self.requests[kind] += 1

    def failure(self, who: str, kind: str, what: str) -> None:
        with self.lock:
            self.failures.append(f"{who} {kind}: {what}")


def visitor(name: str, url: str, until: float, tally: Tally) -> None:
    """One visitor's loop until `until` (time.monotonic()); every request counted, every surprise a failure."""
    from gradio_client import Client, handle_file

    session = None
    rounds = 0
    while time.monotonic() < until:
        rounds += 1

        def call(kind: str, fn, *args, **kwargs):
            tally.request(kind)
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - a load test counts every kind of failure
                tally.failure(name, kind, f"{type(error).__name__}: {str(error)[:200]}")
                return None

        def check(kind: str, ok: bool, what) -> None:
            if not ok:
                tally.failure(name, kind, f"unexpected answer: {str(what)[:200]}")

        # Reload: the page and its config, as a browser does, and a client on the same session
        # (the visitor's folder is found by it, as the browser's kept key would find it).
        page = call("reload", lambda: urllib.request.urlopen(url, timeout=60).read() and urllib.request.urlopen(url + "config", timeout=60).read())
        if page is None:
            continue
        client = Client(url, verbose=False, download_files=False)
        if session:
            client.session_hash = session
        session = client.session_hash
        if time.monotonic() >= until:
            break

        call("clear_pictures", client.predict, api_name="/clear_pictures")
        added = call("add_pictures", client.predict, [handle_file(str(p)) for p in EXAMPLES], api_name="/add_pictures")
        if added is not None:
            check("add_pictures", f"{len(EXAMPLES)} picture(s) ready" in added[2], added[2])

        token = f"<{name}-{rounds}>"
        final = call("train", lambda: client.submit(model="demo", token=token, init="robot", preset="Quick", steps=30, batch_size=4,
                                                    api_name="/train").result())
        embedding = None
        if final is not None:
            check("train", "Done: step 30 / 30" in final[0], final[0][-200:])
            # The Playground's choice, now pointing at the new embedding (an update among the outputs).
            chosen = [o["value"] for o in final if isinstance(o, dict) and str(o.get("value", "")).endswith("learned_embeds.safetensors")]
            embedding = chosen[0] if chosen else None
            check("train", embedding is not None, "no embedding offered to the Playground")
        if embedding and time.monotonic() < until:
            drawn = call("generate", client.predict, model="demo", embedding=embedding, prompt=f"a photo of {token}", steps=2,
                         compare=True, api_name="/generate")
            if drawn is not None:
                check("generate", len(drawn[0] or []) == 1 and len(drawn[1] or []) == 1, drawn)
        if embedding and time.monotonic() < until:
            scores = call("measure", client.predict, model="demo", embedding=embedding, prompt=f"a photo of {token}", steps=1,
                          api_name="/measure")
            if scores is not None:
                check("measure", f"| with `{token}` |" in scores, scores)
        if time.monotonic() >= until:
            break

        # A long textual inversion, stopped once it trains: the run ends "Stopped", its embedding kept.
        tally.request("train")
        job = client.submit(model="demo", token=f"<{name}-ti-{rounds}>", init="robot", preset="Thorough", steps=3000, batch_size=1,
                            grad_accum=1, resolution=64, api_name="/train")
        deadline = time.monotonic() + 300
        while not job.done() and not any("Training: step" in (update[0] or "") for update in job.outputs()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        stopped = call("stop", client.predict, api_name="/stop")
        try:
            final = job.result()
            check("train", "Stopped: step" in final[0] or "Done" in final[0], final[0][-200:])
            if stopped is not None:
                check("stop", "Stopping" in stopped, stopped)
        except Exception as error:  # noqa: BLE001
            tally.failure(name, "train", f"{type(error).__name__}: {str(error)[:200]}")
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()

    from tinv_gui.device import choose_placement

    work = Path(tempfile.mkdtemp(prefix="tinv-load-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    process, url = serve(str(work / "visitors"), work / "app.log")
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                samples.append((time.monotonic(), rss_of(process.pid)))
            except OSError:
                return
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        print(f"server up in {time.monotonic() - started:.0f} s at {url}; {args.visitors} visitors for {args.minutes} min", flush=True)
        begin = time.monotonic()
        tally = Tally()
        until = begin + args.minutes * 60
        threads = [threading.Thread(target=visitor, args=(f"v{i}", url, until, tally)) for i in range(args.visitors)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ended = time.monotonic()
        time.sleep(3)  # memory once the last requests are answered
    except Exception:
        traceback.print_exc()
        raise
    finally:
        done.set()
        sampler.join()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()

    def gb(n: int) -> str:
        return f"{n / 1e9:.2f} GB"

    during = [(t, rss) for t, rss in samples if t >= begin]
    start_rss = during[0][1]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; precision: {choose_placement().describe()}")
    print(f"load average before: {load_before[0]:.1f}, after: {os.getloadavg()[0]:.1f} (other jobs share this machine)")
    print(f"{args.visitors} visitors for {(ended - begin) / 60:.1f} min: {sum(tally.requests.values())} requests, {len(tally.failures)} failures")
    print("requests by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(tally.requests.items())))
    for failure in tally.failures:
        print("  failure:", failure)
    print(f"server memory: start {gb(start_rss)}, end {gb(during[-1][1])}, peak {gb(max(r for _, r in during))}")
    print("memory over time (every 30 s): " + ", ".join(f"{(t - begin):.0f}s {r / 1e9:.2f}" for t, r in during[::30]))


if __name__ == "__main__":
    main()
