"""Embedding files as each tool writes them: one reader for every layout, a writer for each.

Layouts (SD 1.x/2.x vectors are a tensor [n, dim]):
- diffusers: {token: tensor} in .safetensors (with string metadata) or .bin (torch.save).
- a1111-pt: AUTOMATIC1111's torch.save dict: string_to_param {'*': tensor}, string_to_token
  {'*': 265}, name, step, sd_checkpoint, sd_checkpoint_name.
- a1111-safetensors: A1111 and ComfyUI accept any .safetensors holding a single tensor, and both
  name the embedding after the file; the tensor is keyed by the token so diffusers finds the
  name too, and A1111's fields travel in the metadata.
- kohya: {"emb_params": tensor} (kohya's sd-scripts; ComfyUI and A1111 read it as well).
- SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}, whatever the container.

Reading a .pt/.bin never runs code from it: torch.load(weights_only=True) builds only tensors
and plain containers, and refuses a file that asks for anything else.
"""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import atomic_save_safetensors, atomic_torch_save

FORMATS = {
    "diffusers": "diffusers' load_textual_inversion (.safetensors, or .bin by the file name)",
    "a1111-pt": "AUTOMATIC1111 / Forge / ComfyUI .pt",
    "a1111-safetensors": "AUTOMATIC1111 / Forge / ComfyUI .safetensors",
    "kohya": "kohya sd-scripts / ComfyUI .safetensors ({'emb_params': ...})",
}
SUFFIXES = {
    "diffusers": (".safetensors", ".bin"),
    "a1111-pt": (".pt",),
    "a1111-safetensors": (".safetensors",),
    "kohya": (".safetensors",),
}
# Which models a text width belongs to, for messages.
WIDTH_FAMILIES = {64: "the offline demo model", 768: "SD 1.x", 1024: "SD 2.x"}
SDXL_KEYS = ("clip_l", "clip_g")
KOHYA_KEY = "emb_params"
# A1111 always writes the CLIP id of the word '*' here; nothing reads it back.
A1111_STAR_ID = 265
# Metadata keys that describe the file itself; they are rewritten on every save.
_LAYOUT_KEYS = ("format", "token", "name", "vectors", "dim", "step", "sd_checkpoint_name")


class EmbeddingFormatError(ValueError):
    """An embedding file cannot be read or does not fit the chosen model; the message says why."""


@dataclass
class EmbeddingFile:
    """An embedding as read from (or to be written to) a file of any layout."""

    token: str  # the name the file stores, or the file's name when its layout stores none
    vectors: torch.Tensor  # [n, dim] float32; for SDXL, the first text encoder's (clip_l)
    vectors_g: torch.Tensor | None = None  # SDXL only: the second text encoder's (clip_g)
    metadata: dict[str, str] = field(default_factory=dict)  # steps, base_model, init, method, ...
    layout: str = "diffusers"  # the layout it was read from

    @property
    def is_sdxl(self) -> bool:
        return self.vectors_g is not None

    @property
    def step(self) -> int | None:
        value = self.metadata.get("steps")
        return int(value) if value and value.isdigit() else None

    @property
    def widths(self) -> tuple[int, ...]:
        """The text encoder widths it was made for: (768,), or (768, 1280) for SDXL."""
        return (self.vectors.shape[1],) + ((self.vectors_g.shape[1],) if self.is_sdxl else ())

    def describe_width(self) -> str:
        return describe_widths(self.widths)


def width_label(width: int) -> str:
    """'768 (SD 1.x)', or the bare number for a width no known family has."""
    family = WIDTH_FAMILIES.get(width)
    return f"{width} ({family})" if family else str(width)


def describe_widths(widths: tuple[int, ...]) -> str:
    """'text width 768 (SD 1.x)', or 'text widths 768 + 1280 (SDXL)' for a pair."""
    if len(widths) == 2:
        return f"text widths {widths[0]} + {widths[1]} (SDXL)"
    return f"text width {width_label(widths[0])}"


def check_fits(embedding: EmbeddingFile, model_widths: int | tuple[int, ...], name: str = "the embedding") -> None:
    """Raise EmbeddingFormatError unless `embedding` was made for text encoders of `model_widths`:
    one width (SD 1.x/2.x), or SDXL's pair (768, 1280) for an embedding with both parts."""
    model_widths = (model_widths,) if isinstance(model_widths, int) else tuple(model_widths)
    if embedding.widths != model_widths:
        raise EmbeddingFormatError(
            f"{name} was made for a model with {embedding.describe_width()}; the chosen model has "
            f"{describe_widths(model_widths) if len(model_widths) == 2 else width_label(model_widths[0])}. Use it with a model of the family it was made for, or train it again on this one."
        )


def a1111_name(token: str) -> str:
    """The file name A1111 would give the token: it keeps letters, digits, '.', '_', '-' and
    spaces, and its users type the file's name in prompts (so '<my-cat>' becomes 'my-cat')."""
    name = "".join(c for c in token if c.isalnum() or c in "._- ").strip(" .")
    return name or "embedding"


def default_filename(token: str, fmt: str) -> str:
    """The file name each tool expects: diffusers looks for learned_embeds.*, A1111 and ComfyUI
    use the file's name as the word to type."""
    if fmt == "diffusers":
        return "learned_embeds.safetensors"
    return a1111_name(token) + SUFFIXES[fmt][0]


# ---- reading -------------------------------------------------------------------------------


def read_embedding(path: str | Path) -> EmbeddingFile:
    """Read an embedding in any layout above, telling the layout from the content (not the
    file's suffix). Raises EmbeddingFormatError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFormatError(f"embedding file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
        data, metadata = _read_safetensors(path)
    elif head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or an older bare pickle
        data, metadata = _read_torch_file(path), {}
    else:
        raise EmbeddingFormatError(f"{path.name} is neither a .safetensors nor a PyTorch .pt/.bin file")
    return _interpret(data, metadata, path)


def _read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise EmbeddingFormatError(f"{path.name} is a damaged .safetensors file ({error})") from None


def _read_torch_file(path: Path):
    """torch.load that only builds tensors and plain containers, never arbitrary objects."""
    # The original textual inversion code saved its vectors in an nn.ParameterDict; letting the
    # safe loader build that one class (it holds nothing but parameters) reads those files too.
    allow = getattr(torch.serialization, "safe_globals", None)  # PyTorch 2.5 and newer
    try:
        with allow([torch.nn.ParameterDict]) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EmbeddingFormatError(
            f"{path.name} holds Python objects besides tensors{_unsafe_names(path)}; it was not loaded, because "
            "unpickling them could run code. Ask for a .safetensors version of it, or convert it with a tool you trust"
        ) from None
    except Exception as error:  # noqa: BLE001 - any other failure is a damaged file
        raise EmbeddingFormatError(f"{path.name} is not a readable PyTorch file ({type(error).__name__}: {error})") from None


def _unsafe_names(path: Path) -> str:
    try:  # lists the pickle's imports without running them (zip files only)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001
        return ""
    return f" ({', '.join(names[:3])})" if names else ""


def _matrix(tensor, path: Path, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or not tensor.is_floating_point():
        raise EmbeddingFormatError(f"{path.name}: {what} is not a tensor of vectors")
    return _cpu32(tensor.reshape(-1, tensor.shape[-1]))


def _cpu32(tensor: torch.Tensor) -> torch.Tensor:
    # A copy: torch.save writes a view's whole storage, which may be far larger than the view.
    return tensor.detach().to("cpu", torch.float32, copy=True).contiguous()


def _interpret(data, metadata: dict[str, str], path: Path) -> EmbeddingFile:
    stored_name = metadata.get("token") or metadata.get("name")
    extra = {k: v for k, v in metadata.items() if k not in _LAYOUT_KEYS}
    if isinstance(data, torch.Tensor):  # a bare tensor: the file's name is all the name there is
        return EmbeddingFile(path.stem, _matrix(data, path, "the tensor"), metadata=extra, layout="tensor")
    if not isinstance(data, dict):
        raise EmbeddingFormatError(f"{path.name} holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        return _interpret_a1111(data, path)
    if all(key in data for key in SDXL_KEYS):
        return EmbeddingFile(
            stored_name or path.stem,
            _matrix(data["clip_l"], path, "clip_l"),
            _matrix(data["clip_g"], path, "clip_g"),
            metadata=extra,
            layout="sdxl",
        )
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        raise EmbeddingFormatError(
            f"{path.name} holds {len(tensors)} tensors ({', '.join(list(tensors)[:5])}); an embedding file holds "
            "one (or clip_l and clip_g for SDXL)"
        )
    key, tensor = next(iter(tensors.items()))
    if key == KOHYA_KEY:
        return EmbeddingFile(stored_name or path.stem, _matrix(tensor, path, key), metadata=extra, layout="kohya")
    layout = metadata.get("format") if metadata.get("format") in FORMATS else "diffusers"
    return EmbeddingFile(key, _matrix(tensor, path, key), metadata=extra, layout=layout)


def _interpret_a1111(data: dict, path: Path) -> EmbeddingFile:
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)  # a ParameterDict keeps its tensors there
    if len(params) != 1:
        raise EmbeddingFormatError(f"{path.name} holds {len(params)} embeddings; one per file is expected")
    metadata = {}
    if isinstance(data.get("step"), int):
        metadata["steps"] = str(data["step"])
    for key, name in (("sd_checkpoint_name", "base_model"), ("sd_checkpoint", "sd_checkpoint")):
        if isinstance(data.get(key), str):
            metadata[name] = data[key]
    name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else path.stem
    return EmbeddingFile(name, _matrix(next(iter(params.values())), path, "string_to_param"), metadata=metadata, layout="a1111-pt")


# ---- writing -------------------------------------------------------------------------------


def write_embedding(embedding: EmbeddingFile, path: str | Path, fmt: str) -> Path:
    """Write `embedding` in layout `fmt` (one of FORMATS), atomically; returns the path.

    SDXL embeddings are written as {"clip_l", "clip_g"} in the container `fmt` implies, since
    that is the one SDXL layout every tool reads."""
    path = Path(path)
    if fmt not in FORMATS:
        raise EmbeddingFormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path.suffix.lower() not in SUFFIXES[fmt]:
        raise EmbeddingFormatError(f"{fmt} files end in {' or '.join(SUFFIXES[fmt])}, not {path.name!r}")
    if embedding.is_sdxl:
        tensors = {"clip_l": embedding.vectors, "clip_g": embedding.vectors_g}
    elif fmt == "kohya":
        tensors = {KOHYA_KEY: embedding.vectors}
    elif fmt == "a1111-pt":
        return atomic_torch_save(_a1111_dict(embedding), path)
    else:
        tensors = {embedding.token: embedding.vectors}
    if path.suffix.lower() == ".safetensors":
        return atomic_save_safetensors(tensors, path, _header(embedding, fmt))
    return atomic_torch_save({k: _cpu32(v) for k, v in tensors.items()}, path)


def _header(embedding: EmbeddingFile, fmt: str) -> dict[str, str]:
    header = {k: str(v) for k, v in embedding.metadata.items() if v is not None}
    header.update(format=fmt, token=embedding.token, vectors=str(embedding.vectors.shape[0]), dim=str(embedding.vectors.shape[1]))
    if fmt.startswith("a1111"):  # A1111's own field names, for tools that show them
        header["name"] = embedding.token
        if embedding.step is not None:
            header["step"] = str(embedding.step)
        if embedding.metadata.get("base_model"):
            header["sd_checkpoint_name"] = embedding.metadata["base_model"]
    return header


def _a1111_dict(embedding: EmbeddingFile) -> dict:
    return {
        "string_to_token": {"*": A1111_STAR_ID},
        "string_to_param": {"*": _cpu32(embedding.vectors)},
        "name": embedding.token,
        "step": embedding.step,
        "sd_checkpoint": embedding.metadata.get("sd_checkpoint"),
        "sd_checkpoint_name": embedding.metadata.get("base_model"),
    }


def convert(source: str | Path, fmt: str, output: str | Path, token: str | None = None) -> Path:
    """Read `source` in any layout and write it as `fmt`. `output` is a file, or a folder to
    write the format's usual file name into. `token` renames the embedding."""
    embedding = read_embedding(source)
    if token:
        embedding.token = token
    if Path(output).is_dir() or str(output).endswith(("/", "\\")):  # Path() would drop the slash
        output = Path(output) / default_filename(embedding.token, fmt)
    return write_embedding(embedding, output, fmt)


def export_all(embedding_path: str | Path, out_dir: str | Path | None = None) -> dict[str, str]:
    """Write a finished run's embedding in every format, one folder per format (A1111 would
    load a .pt and a .safetensors of the same name twice), under `out_dir`
    (default: an `export` folder beside the embedding). Returns {format: path}; "diffusers-bin"
    is diffusers' older learned_embeds.bin."""
    embedding = read_embedding(embedding_path)
    out_dir = Path(out_dir) if out_dir else Path(embedding_path).parent / "export"
    written = {fmt: str(write_embedding(embedding, out_dir / fmt / default_filename(embedding.token, fmt), fmt)) for fmt in FORMATS}
    written["diffusers-bin"] = str(write_embedding(embedding, out_dir / "diffusers" / "learned_embeds.bin", "diffusers"))
    return written
