"""Embedding files as each tool writes them: one reader for every layout, a writer for each.

Layouts (SD 1.x/2.x vectors are a tensor [n, dim]):
- diffusers: {token: tensor} in .safetensors (with string metadata) or .bin (torch.save); for
  SDXL, diffusers' example writes two such files, learned_embeds (first text encoder) and
  learned_embeds_2 (second).
- a1111-pt: AUTOMATIC1111's torch.save dict: string_to_param {'*': tensor}, string_to_token
  {'*': 265}, name, step, sd_checkpoint, sd_checkpoint_name.
- a1111-safetensors: A1111 and ComfyUI accept any .safetensors holding a single tensor.
- a1111-png: A1111's embedding card, a picture with the a1111-pt dict inside (see cards.py).
- kohya: {"emb_params": tensor} (kohya's sd-scripts; InvokeAI, ComfyUI and A1111 read it too).
- onetrainer: {"emp_params": tensor} (sic), and "emp_params_out" for an output embedding.
- SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}, whatever the container (OneTrainer adds
  clip_l_out / clip_g_out); LoRA files may bundle embeddings as bundle_emb.<name>.<key>.

The name to type is the one the tool that wrote the layout uses: A1111, ComfyUI, kohya and
OneTrainer call an embedding by its file's name (whatever name is stored inside), diffusers by
the key of its tensor; an A1111 card and a LoRA bundle by the name stored with the vectors.
Files written here store that same name wherever a layout has room for one, so every tool
calls them alike.

Reading a .pt/.bin never runs code from it: torch.load(weights_only=True) builds only tensors
and plain containers, and refuses a file that asks for anything else.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import atomic_save_safetensors, atomic_write

FORMATS = {
    "diffusers": "diffusers' load_textual_inversion (.safetensors, or .bin by the file name; SDXL: two files)",
    "a1111-pt": "AUTOMATIC1111 / Forge / ComfyUI / InvokeAI .pt",
    "a1111-safetensors": "AUTOMATIC1111 / Forge / ComfyUI .safetensors",
    "kohya": "kohya sd-scripts / InvokeAI / ComfyUI / A1111 .safetensors ({'emb_params': ...})",
    "onetrainer": "OneTrainer .safetensors ({'emp_params': ...}; SDXL {'clip_l', 'clip_g'})",
    "a1111-png": "AUTOMATIC1111 / Forge embedding card: a .png picture with the embedding inside",
}
SUFFIXES = {
    "diffusers": (".safetensors", ".bin"),
    "a1111-pt": (".pt",),
    "a1111-safetensors": (".safetensors",),
    "kohya": (".safetensors",),
    "onetrainer": (".safetensors",),
    "a1111-png": (".png",),
}
# Layouts whose tools call the embedding by its file's name.
NAMED_BY_FILE = ("a1111-pt", "a1111-safetensors", "kohya", "onetrainer", "sdxl", "clip_l", "tensor")
# Which models a text width belongs to, for messages.
WIDTH_FAMILIES = {64: "the offline demo model", 768: "SD 1.x", 1024: "SD 2.x"}
SDXL_KEYS = ("clip_l", "clip_g")
KOHYA_KEY = "emb_params"
ONETRAINER_KEY = "emp_params"
BUNDLE_PREFIX = "bundle_emb."
SDXL_SECOND_FILE_SUFFIX = "_2"  # diffusers' SDXL example: learned_embeds.safetensors, learned_embeds_2.safetensors
# A1111 always writes the CLIP id of the word '*' here; nothing reads it back.
A1111_STAR_ID = 265
# Metadata keys that describe the file itself; they are rewritten on every save.
_LAYOUT_KEYS = ("format", "token", "name", "vectors", "dim", "step", "sd_checkpoint_name")
# The only records A1111's safe unpickler allows in a torch zip (its oldest, strictest list).
TORCH_ZIP_RECORDS = re.compile(r"archive/(data\.pkl|version|data/\d+)")


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
    path: Path | None = None  # the file it was read from

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
        hint = ""
        if len(model_widths) == 2 and embedding.widths in ((model_widths[0],), (model_widths[1],)):
            hint = (
                f" If it is the {'first' if embedding.widths[0] == model_widths[0] else 'second'} of diffusers' two SDXL files "
                "(learned_embeds.safetensors for the first text encoder, learned_embeds_2.safetensors for the second), "
                "give both files together (a second --embedding, or upload both)."
            )
        raise EmbeddingFormatError(
            f"{name} was made for a model with {embedding.describe_width()}; the chosen model has "
            f"{describe_widths(model_widths) if len(model_widths) == 2 else width_label(model_widths[0])}. Use it with a model of the family it was made for, or train it again on this one."
            + hint
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


def read_embedding(path: str | Path, second: str | Path | None = None) -> EmbeddingFile:
    """Read an embedding in any layout above, telling the layout from the content (not the
    file's suffix). `second` is the learned_embeds_2 file of diffusers' SDXL two-file output.
    Raises EmbeddingFormatError naming the file, the layout found and what would work."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFormatError(f"embedding file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:8] == b"\x89PNG\r\n\x1a\n" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        embedding = _read_card(path)
    else:
        if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
            data, metadata = _read_safetensors(path)
        elif head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or an older bare pickle
            data, metadata = _read_torch_file(path), {}
        else:
            raise EmbeddingFormatError(f"{path.name} is neither a .safetensors, a PyTorch .pt/.bin file nor an A1111 .png/.webp embedding card")
        embedding = _interpret(data, metadata, path)
    embedding.path = path
    if second is not None:
        embedding = join_sdxl_halves(embedding, read_embedding(second))
    return embedding


def read_embeddings(paths) -> list[EmbeddingFile]:
    """Read several embedding files. Two files in diffusers' layout that hold the same token,
    one after the other, are the halves of diffusers' SDXL output and become one SDXL embedding."""
    embeddings: list[EmbeddingFile] = []
    for path in paths:
        embedding = read_embedding(path)
        previous = embeddings[-1] if embeddings else None
        if previous is not None and _are_sdxl_halves(previous, embedding):
            embeddings[-1] = join_sdxl_halves(previous, embedding)
        else:
            embeddings.append(embedding)
    return embeddings


def _are_sdxl_halves(first: EmbeddingFile, second: EmbeddingFile) -> bool:
    return (
        first.layout == second.layout == "diffusers"
        and first.token == second.token
        and not first.is_sdxl
        and not second.is_sdxl
        and first.vectors.shape[0] == second.vectors.shape[0]
        and first.vectors.shape[1] != second.vectors.shape[1]  # SDXL's two encoders differ in width
    )


def join_sdxl_halves(first: EmbeddingFile, second: EmbeddingFile) -> EmbeddingFile:
    """One SDXL embedding from diffusers' two files (learned_embeds: first text encoder,
    learned_embeds_2: second), given in either order."""
    if first.path is not None and first.path.stem.endswith(SDXL_SECOND_FILE_SUFFIX):
        first, second = second, first
    names = " and ".join(e.path.name if e.path else e.token for e in (first, second))
    if first.is_sdxl or second.is_sdxl:
        raise EmbeddingFormatError(f"{names}: one of them already holds both SDXL text encoders' parts; give that file alone")
    if first.vectors.shape[0] != second.vectors.shape[0] or first.token != second.token:
        raise EmbeddingFormatError(
            f"{names} are not the two halves of one SDXL embedding: they hold {first.token!r} ({first.vectors.shape[0]} vectors) "
            f"and {second.token!r} ({second.vectors.shape[0]} vectors). Give learned_embeds and learned_embeds_2 of the same training"
        )
    metadata = {**second.metadata, **first.metadata}
    return EmbeddingFile(first.token, first.vectors, second.vectors, metadata, "diffusers-sdxl", first.path)


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


def _read_card(path: Path) -> EmbeddingFile:
    """An A1111 .png/.webp card: named, as A1111 names it, by the name stored inside."""
    from .cards import CardError, read_card

    try:
        data = read_card(path)
    except CardError as error:
        raise EmbeddingFormatError(f"{path.name}: {error}. An A1111 embedding card holds it in its sd-ti-embedding text or in its pixels") from None
    except OSError as error:
        raise EmbeddingFormatError(f"{path.name} is not a readable picture ({error})") from None
    embedding = _interpret(data, {}, path)
    stored = data.get("name")
    if isinstance(stored, str) and stored.strip():
        embedding.token = stored
    embedding.layout = "a1111-png"
    return embedding


def _matrix(tensor, path: Path, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or not tensor.is_floating_point():
        raise EmbeddingFormatError(f"{path.name}: {what} is not a tensor of vectors")
    return _cpu32(tensor.reshape(-1, tensor.shape[-1]))


def _cpu32(tensor: torch.Tensor) -> torch.Tensor:
    # A copy: torch.save writes a view's whole storage, which may be far larger than the view.
    return tensor.detach().to("cpu", torch.float32, copy=True).contiguous()


def _interpret(data, metadata: dict[str, str], path: Path) -> EmbeddingFile:
    extra = {k: v for k, v in metadata.items() if k not in _LAYOUT_KEYS}
    # tinv-gui's own files (a run's embedding, a diffusers export) carry the token they teach.
    own_token = metadata.get("token") if metadata.get("format") == "diffusers" else None
    if isinstance(data, torch.Tensor):  # a bare tensor: the file's name is all the name there is
        return EmbeddingFile(path.stem, _matrix(data, path, "the tensor"), metadata=extra, layout="tensor")
    if not isinstance(data, dict):
        raise EmbeddingFormatError(f"{path.name} holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        return _interpret_a1111(data, path)
    bundled = sorted({key.split(".")[1] for key in data if isinstance(key, str) and key.startswith(BUNDLE_PREFIX) and key.count(".") >= 2})
    if bundled:
        return _interpret_bundle(data, bundled, path)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if all(key in tensors for key in SDXL_KEYS):  # OneTrainer's clip_l_out / clip_g_out are output embeddings: not used
        clip_l, clip_g = (_matrix(tensors[key], path, key) for key in SDXL_KEYS)
        return EmbeddingFile(own_token or path.stem, clip_l, clip_g, metadata=extra, layout="sdxl")
    if "clip_g" in tensors:
        raise EmbeddingFormatError(
            f"{path.name} holds clip_g, the second text encoder's part of an SDXL embedding, without clip_l, the first's; "
            "SDXL needs both. Use a file holding clip_l and clip_g"
        )
    for key, layout in ((KOHYA_KEY, "kohya"), (ONETRAINER_KEY, "onetrainer"), ("clip_l", "clip_l")):
        if key in tensors:  # OneTrainer's emp_params_out, beside emp_params, is an output embedding: not used
            return EmbeddingFile(path.stem, _matrix(tensors[key], path, key), metadata=extra, layout=layout)
    if ONETRAINER_KEY + "_out" in tensors:
        raise EmbeddingFormatError(
            f"{path.name} holds only emp_params_out, a OneTrainer output embedding (it replaces the text encoder's outputs, "
            "not a word's input vectors), which no other tool reads. Train it in OneTrainer as an ordinary (input) embedding, saved as emp_params"
        )
    if len(tensors) != 1:
        raise EmbeddingFormatError(
            f"{path.name} holds {len(tensors)} tensors ({', '.join(list(tensors)[:5])}) and none of the keys of an embedding layout; "
            "an embedding file holds one tensor (diffusers, A1111), string_to_param (A1111 .pt), emb_params (kohya), "
            "emp_params (OneTrainer), clip_l and clip_g (SDXL), or bundle_emb.<name>.* (a LoRA with an embedding)"
        )
    key, tensor = next(iter(tensors.items()))
    layout = metadata.get("format") if metadata.get("format") in FORMATS else "diffusers"
    name = path.stem if layout in NAMED_BY_FILE else key
    return EmbeddingFile(name, _matrix(tensor, path, key), metadata=extra, layout=layout)


def _interpret_a1111(data: dict, path: Path) -> EmbeddingFile:
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)  # a ParameterDict keeps its tensors there
    if not isinstance(params, dict) or len(params) != 1:
        raise EmbeddingFormatError(
            f"{path.name} is an A1111 embedding holding {len(params) if isinstance(params, dict) else 'no'} vectors sets in "
            "string_to_param; A1111 (and tinv-gui) read files holding exactly one"
        )
    metadata = {}
    if isinstance(data.get("step"), int):
        metadata["steps"] = str(data["step"])
    for key, name in (("sd_checkpoint_name", "base_model"), ("sd_checkpoint", "sd_checkpoint"), ("hash", "sd_checkpoint")):
        if isinstance(data.get(key), str) and name not in metadata:
            metadata[name] = data[key]
    if isinstance(data.get("name"), str):
        metadata["stored_name"] = data["name"]  # A1111 itself ignores it for .pt files
    vectors = _matrix(next(iter(params.values())), path, "string_to_param")
    return EmbeddingFile(path.stem, vectors, metadata=metadata, layout="a1111-pt")


def _interpret_bundle(data: dict, names: list[str], path: Path) -> EmbeddingFile:
    """The embedding part of a LoRA file (bundle_emb.<name>.clip_l, .string_to_param.*, ...),
    named as A1111 names it: by <name>."""
    if len(names) > 1:
        raise EmbeddingFormatError(
            f"{path.name} is a LoRA with {len(names)} embeddings bundled in it ({', '.join(names)}); tinv-gui reads one "
            "embedding a file. Use it in A1111 or ComfyUI, which load the bundle with the LoRA, or ask for the embeddings as files of their own"
        )
    prefix = f"{BUNDLE_PREFIX}{names[0]}."
    part: dict = {}
    for key, value in data.items():
        if isinstance(key, str) and key.startswith(prefix):
            inner = key[len(prefix) :]
            if inner.startswith("string_to_param."):  # A1111 nests these back into a dict
                part.setdefault("string_to_param", {})[inner.split(".", 1)[1]] = value
            else:
                part[inner] = value
    embedding = _interpret(part, {}, path)
    embedding.token, embedding.layout = names[0], "lora-bundle"
    return embedding


# ---- writing -------------------------------------------------------------------------------


def torch_file_bytes(obj) -> bytes:
    """torch.save's zip format, holding only the records A1111's safe unpickler allows
    (archive/data.pkl, archive/data/N, archive/version): saved to memory, torch names the folder
    inside 'archive' (saved to a file, it would take the file's name), and the records newer
    torch adds (.format_version, .storage_alignment, byteorder, .data/serialization_id) are
    left out; torch.load reads the file without them."""
    saved = io.BytesIO()
    torch.save(obj, saved)
    out = io.BytesIO()
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for name in source.namelist():
            if TORCH_ZIP_RECORDS.fullmatch(name):
                target.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), source.read(name))
    return out.getvalue()


def atomic_torch_save(obj, path: str | Path) -> Path:
    """Save `obj` as torch_file_bytes into a temporary file beside `path`, then move it into place."""
    data = torch_file_bytes(obj)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_embedding(embedding: EmbeddingFile, path: str | Path, fmt: str, picture=None) -> Path:
    """Write `embedding` in layout `fmt` (one of FORMATS), atomically; returns the path.

    Layouts whose tools name an embedding after its file store the file's name as its name
    (A1111's `name`, the tensor's key), so every tool calls it by the same word. SDXL
    embeddings are written as {"clip_l", "clip_g"}, except for diffusers, whose SDXL example
    writes a second file `<name>_2` beside the first. `picture` is a1111-png's preview."""
    path = Path(path)
    if fmt not in FORMATS:
        raise EmbeddingFormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path.suffix.lower() not in SUFFIXES[fmt]:
        raise EmbeddingFormatError(f"{fmt} files end in {' or '.join(SUFFIXES[fmt])}, not {path.name!r}")
    name = embedding.token if fmt == "diffusers" else path.stem
    if fmt == "a1111-png":
        from .cards import card_bytes, plain_picture

        data = card_bytes(_a1111_dict(embedding, name), picture if picture is not None else plain_picture(name))
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    if fmt == "diffusers" and embedding.is_sdxl:
        second = path.with_name(path.stem + SDXL_SECOND_FILE_SUFFIX + path.suffix)
        _write_tensors({name: embedding.vectors_g}, second, _header(embedding, fmt, name))
        return _write_tensors({name: embedding.vectors}, path, _header(embedding, fmt, name))
    if embedding.is_sdxl:
        tensors = {"clip_l": embedding.vectors, "clip_g": embedding.vectors_g}
    elif fmt == "a1111-pt":
        return atomic_torch_save(_a1111_dict(embedding, name), path)
    else:
        key = {"kohya": KOHYA_KEY, "onetrainer": ONETRAINER_KEY}.get(fmt, name)
        tensors = {key: embedding.vectors}
    return _write_tensors(tensors, path, _header(embedding, fmt, name))


def _write_tensors(tensors: dict, path: Path, header: dict[str, str]) -> Path:
    if path.suffix.lower() == ".safetensors":
        return atomic_save_safetensors(tensors, path, header)
    return atomic_torch_save({k: _cpu32(v) for k, v in tensors.items()}, path)  # .bin/.pt hold the tensors alone


def _header(embedding: EmbeddingFile, fmt: str, name: str) -> dict[str, str]:
    header = {k: str(v) for k, v in embedding.metadata.items() if v is not None and k != "stored_name"}
    header.update(format=fmt, token=name, vectors=str(embedding.vectors.shape[0]), dim=str(embedding.vectors.shape[1]))
    if fmt.startswith("a1111"):  # A1111's own field names, for tools that show them
        header["name"] = name
        if embedding.step is not None:
            header["step"] = str(embedding.step)
        if embedding.metadata.get("base_model"):
            header["sd_checkpoint_name"] = embedding.metadata["base_model"]
    return header


def _a1111_dict(embedding: EmbeddingFile, name: str) -> dict:
    if embedding.is_sdxl:  # A1111 reads SDXL as {clip_l, clip_g}, with nothing else beside them
        return {"clip_l": _cpu32(embedding.vectors), "clip_g": _cpu32(embedding.vectors_g)}
    return {
        "string_to_token": {"*": A1111_STAR_ID},
        "string_to_param": {"*": _cpu32(embedding.vectors)},
        "name": name,
        "step": embedding.step,
        "sd_checkpoint": embedding.metadata.get("sd_checkpoint"),
        "sd_checkpoint_name": embedding.metadata.get("base_model"),
    }


def convert(source: str | Path, fmt: str, output: str | Path, token: str | None = None, second: str | Path | None = None, picture=None) -> Path:
    """Read `source` (and `second`, the learned_embeds_2 of diffusers' SDXL output) in any
    layout and write it as `fmt`. `output` is a file, or a folder to write the format's usual
    file name into. `token` renames the embedding; `picture` is an a1111-png card's preview."""
    embedding = read_embedding(source, second)
    if token:
        embedding.token = token
    if Path(output).is_dir() or str(output).endswith(("/", "\\")):  # Path() would drop the slash
        output = Path(output) / default_filename(embedding.token, fmt)
    return write_embedding(embedding, output, fmt, picture)


def export_all(embedding_path: str | Path, out_dir: str | Path | None = None, picture=None) -> dict[str, str]:
    """Write a finished run's embedding in every format, one folder per format (A1111 would
    load a .pt and a .safetensors of the same name twice), under `out_dir`
    (default: an `export` folder beside the embedding). Returns {format: path}; "diffusers-bin"
    is diffusers' older learned_embeds.bin; for SDXL, "diffusers-2" (and "diffusers-bin-2")
    are the second files of diffusers' two-file layout. `picture` is the card's preview."""
    embedding = read_embedding(embedding_path)
    out_dir = Path(out_dir) if out_dir else Path(embedding_path).parent / "export"
    written = {
        fmt: str(write_embedding(embedding, out_dir / fmt / default_filename(embedding.token, fmt), fmt, picture)) for fmt in FORMATS
    }
    written["diffusers-bin"] = str(write_embedding(embedding, out_dir / "diffusers" / "learned_embeds.bin", "diffusers"))
    if embedding.is_sdxl:
        for key in ("diffusers", "diffusers-bin"):
            first = Path(written[key])
            written[key + "-2"] = str(first.with_name(first.stem + SDXL_SECOND_FILE_SUFFIX + first.suffix))
    return written
