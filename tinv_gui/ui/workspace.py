"""Per-visitor working folders.

Each visitor (one Gradio session) gets a folder of its own, by default under the system's
temporary folder (TINV_GUI_VISITORS chooses another), from where Gradio hands files out only
through its own cache, never by their path. Every file the app reads for a visitor or offers for
download must lie inside the visitor's folder. Uploads are copied in under sanitized names.
Folders left unused for a while are deleted.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .host import host_number

# How long a visitor's folder lives after its last use; long enough to come back for a result.
DEFAULT_MAX_AGE_S = host_number("TINV_GUI_VISITOR_HOURS") * 3600
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SESSION_KEY = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
LAST_USED_FILE = ".last_used"
STOP_FILE = ".stop_requested"  # Stop pressed: read by whichever process runs the visitor's job
SECRET_FILE = ".visitor-key-secret"
HANDOUT_FOLDER = "tinv-gui-handout"  # copies of files handed to visitors, when their folders lie outside the temp folder


def sanitize_filename(name: str, fallback: str = "file") -> str:
    """A safe base name for an uploaded file: no folders, no leading dots, only [A-Za-z0-9._-]."""
    base = re.split(r"[\\/]", name or "")[-1]
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = _UNSAFE_NAME_CHARS.sub("_", stem).strip("._-")[:80] or fallback
    suffix = _UNSAFE_NAME_CHARS.sub("", suffix)[:16].lower()
    return f"{stem}.{suffix}" if suffix else stem


def unique_path(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/name-2.ext`, ... when that is taken."""
    path = folder / name
    stem, suffix = path.stem, path.suffix
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def _gradio_takes_files_from(folder: Path) -> bool:
    """True when Gradio accepts a handler's files from `folder` without it being in allowed_paths."""
    resolved = folder.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in (tempfile.gettempdir(), os.getcwd()))


class Workspace:
    """One visitor's folder: pictures to train on, refused pictures, runs, loaded embeddings, images."""

    def __init__(self, root: Path):
        self.root = root
        self.pictures = root / "pictures"  # what training reads (with caption sidecars)
        self.rejected = root / "rejected"  # uploads that cannot be used, kept to show why
        self.runs = root / "runs"  # one folder per training run
        self.embeddings = root / "embeddings"  # embedding files loaded into the Playground
        self.images = root / "images"  # generated pictures
        for folder in (self.pictures, self.rejected, self.runs, self.embeddings, self.images):
            folder.mkdir(parents=True, exist_ok=True)
        self.touch()

    @property
    def key(self) -> str:
        return self.root.name

    def touch(self) -> None:
        (self.root / LAST_USED_FILE).write_text(str(time.time()))

    def contains(self, path: str | os.PathLike) -> bool:
        """True when `path` (after resolving links and '..') is inside this folder."""
        try:
            return Path(path).resolve().is_relative_to(self.root.resolve())
        except (OSError, ValueError):
            return False

    def inside(self, path: str | os.PathLike) -> Path:
        """`path` itself when it lies inside this folder; PermissionError otherwise."""
        if not self.contains(path):
            raise PermissionError(f"{Path(path).name} is not one of your files")
        return Path(path).resolve()

    def served(self, path: str | os.PathLike) -> str:
        """`path` (one of this visitor's files) as a file the page may hand to this visitor.

        Gradio takes a handler's files from the system's temporary folder (or the working folder)
        into its cache, from where only the session they were given to gets a link to them. A
        visitors' folder elsewhere is not added to Gradio's allowed paths (that would serve every
        file in it to anyone naming its path, and inline): its files are copied, once, into a
        hand-out folder under the temporary folder instead."""
        path = self.inside(path)
        if _gradio_takes_files_from(self.root):
            return str(path)
        handout = Path(tempfile.gettempdir()) / HANDOUT_FOLDER / self.key / path.relative_to(self.root.resolve())
        if not handout.exists() or handout.stat().st_mtime < path.stat().st_mtime:
            handout.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, handout)
        return str(handout)

    def request_stop(self) -> None:
        """Leave word for the visitor's running job to stop. A file, not a flag in memory,
        because on ZeroGPU the job runs in another process than the Stop button's handler."""
        (self.root / STOP_FILE).touch()

    def take_stop_request(self) -> bool:
        """True once for each Stop pressed since the last call."""
        try:
            (self.root / STOP_FILE).unlink()
            return True
        except FileNotFoundError:
            return False

    def new_run_dir(self, token: str) -> Path:
        """A fresh folder for one training run, named after the token and the time."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{sanitize_filename(token, 'run')}"
        path = unique_path(self.runs, name)
        path.mkdir(parents=True)
        return path


class Workspaces:
    """Hands out visitors' folders by session key and deletes the ones left unused."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = DEFAULT_MAX_AGE_S, in_use=None):
        default = os.environ.get("TINV_GUI_VISITORS") or Path(tempfile.gettempdir()) / "tinv-gui-visitors"
        self.root = Path(root or default)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        # Whether a visitor's folder is in use (a job of theirs running): such folders are kept.
        self.in_use: Callable[[str], bool] = in_use or (lambda key: False)

    def secret(self) -> str:
        """The secret that seals the visitor key kept in each browser. It must outlive a restart,
        or every returning visitor would get a new, empty folder: TINV_GUI_SECRET when set, else
        one made once and kept in a private file beside the visitors' folders."""
        if os.environ.get("TINV_GUI_SECRET"):
            return os.environ["TINV_GUI_SECRET"]
        path = self.root / SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def get(self, session_key: str | None) -> Workspace:
        """The folder of the visitor with this session key, created on first use."""
        if not session_key or not _SESSION_KEY.match(session_key):
            raise PermissionError("this page has no valid session; reload it")
        root = self.root / session_key
        if not root.exists():
            self.expire()
        return Workspace(root)

    def holds_files(self, session_key: str) -> bool:
        """True when the visitor's folder holds anything of theirs (pictures, runs, embeddings...)."""
        root = self.root / session_key
        for sub in ("pictures", "rejected", "runs", "embeddings", "images"):
            try:
                with os.scandir(root / sub) as entries:
                    if any(True for _ in entries):
                        return True
            except OSError:
                continue
        return False

    def exists(self, session_key: str) -> bool:
        """True when a visitor with this key has a folder (kept from an earlier visit)."""
        return bool(_SESSION_KEY.match(session_key or "")) and (self.root / session_key).is_dir()

    def expire(self, now: float | None = None) -> list[str]:
        """Delete folders unused for longer than `max_age_s`; returns the keys deleted.
        Runs at most once a minute unless `now` is given (tests)."""
        with self._lock:
            current = time.time() if now is None else now
            if now is None and current - self._last_sweep < 60:
                return []
            self._last_sweep = current
            removed = []
            for folder in self.root.iterdir():
                if not folder.is_dir() or self.in_use(folder.name):
                    continue
                marker = folder / LAST_USED_FILE
                last_used = marker.stat().st_mtime if marker.exists() else folder.stat().st_mtime
                if current - last_used > self.max_age_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    shutil.rmtree(Path(tempfile.gettempdir()) / HANDOUT_FOLDER / folder.name, ignore_errors=True)
                    removed.append(folder.name)
            return removed
