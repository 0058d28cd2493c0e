"""Writing files so that a crash, a full disk or a stop never leaves half a file where a good one was.

Every file tinv-gui writes goes through `atomic_write`: the content is written to a temporary
file beside the target, flushed to disk, then moved into place in one step (os.replace). The
helpers below are the kinds of file the project writes: text (JSON, prompts), safetensors, and
torch.save for the formats other tools read.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

# Below this much free space, a write that failed is taken to have failed for want of space:
# not every writer says so (torch.save reports "basic_ios::clear", safetensors its own error).
FULL_DISK_BYTES = 1 << 20


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)`, then move the result into place, so that a crash never
    leaves a half-written file where `path` was. A write that fails on a full disk raises
    OSError(ENOSPC) naming `path`, whichever library was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the usual permissions for a file to share.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as error:
        full = _disk_is_full(error, path.parent)  # asked while the half-written file still fills it
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _disk_is_full(error: Exception, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file (JSON, a prompt) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (as float32, on the CPU) and string metadata to a safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save into a temporary file beside `path`, then move it into place."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_image(image, path: str | Path) -> Path:
    """Save a PIL image atomically, in the format its suffix names (.png, .jpg, ...)."""
    from PIL import Image

    kind = Image.registered_extensions().get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(f"{Path(path).name}: cannot tell a picture format from its suffix; use .png or .jpg")
    return atomic_write(path, lambda tmp: image.save(tmp, format=kind))
