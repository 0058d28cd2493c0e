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
- several text encoders: a key per encoder, as OneTrainer names them (the family's
  embedding_keys): SDXL {"clip_l": [n, 768], "clip_g": [n, 1280]}, SD 3.x {"clip_l", "clip_g",
  "t5": [n, 4096]}, Flux.1 {"clip_l", "t5"}, whatever the container (OneTrainer adds clip_l_out /
  ..._out); LoRA files may bundle embeddings as bundle_emb.<name>.<key>.

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

from .families import FAMILIES
from .files import atomic_save_safetensors, atomic_write

FORMATS = {
    "diffusers": "diffusers' load_textual_inversion (.safetensors, or .bin by the file name; SDXL: two files; SD 3.x / Flux.1: one file, a key per text encoder)",
    "a1111-pt": "AUTOMATIC1111 / Forge / ComfyUI / InvokeAI .pt",
    "a1111-safetensors": "AUTOMATIC1111 / Forge / ComfyUI .safetensors",
    "kohya": "kohya sd-scripts / InvokeAI / ComfyUI / A1111 .safetensors ({'emb_params': ...})",
    "onetrainer": "OneTrainer .safetensors ({'emp_params': ...}; SDXL {'clip_l', 'clip_g'}, SD 3.x + 't5', Flux.1 {'clip_l', 't5'})",
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
# The families whose embeddings hold a part per text encoder, by their parts' keys (their
# embedding_keys, in order), and every such key in that order: clip_l, clip_g, t5.
FAMILY_OF_KEYS = {family.embedding_keys: family for family in FAMILIES if family.embedding_keys}
ENCODER_KEYS = tuple(dict.fromkeys(key for keys in FAMILY_OF_KEYS for key in keys))
FAMILY_NAMES = {family.name: family for family in FAMILIES}
# The metadata key naming the family a file was made for (tinv-gui writes it): the parts' keys
# alone do not always tell, since OneTrainer leaves out the part of a text encoder it did not load
# (an SD 3.x file without T5 holds clip_l and clip_g, as an SDXL file does).
FAMILY_KEY = "family"
# The key of the one part of an embedding for a model with one text encoder (SD 1.x/2.x), whose
# family has no embedding_keys. '*' as in A1111's string_to_param; no file stores it.
ONE_ENCODER = "*"
# diffusers' textual inversion example writes SDXL's parts as a file per text encoder (see
# write_embedding); every other family's parts go into one file, as its advanced scripts write them.
DIFFUSERS_FILE_PER_ENCODER = (("clip_l", "clip_g"),)
# The formats whose tools load embeddings with a T5 part (SD 3.x, Flux.1): OneTrainer reads its
# {clip_l, (clip_g), t5} files, diffusers takes a part per text encoder; AUTOMATIC1111/Forge, kohya
# sd-scripts and InvokeAI have no textual inversion for these families.
FORMATS_WITH_T5 = ("diffusers", "onetrainer")
# ComfyUI's T5 tokenizers (SD 3.x, Flux.1) look an embedding's T5 part up under "t5xxl", where
# OneTrainer writes "t5"; without it they take the file's first tensor (clip_l, of the wrong width)
# and ignore it. Files with a T5 part hold it under both keys, so ComfyUI applies it too.
COMFYUI_KEYS = {"t5": "t5xxl"}
# Layouts whose tools call the embedding by its file's name.
NAMED_BY_FILE = ("a1111-pt", "a1111-safetensors", "kohya", "onetrainer", "clip_l", "tensor", *(f.name for f in FAMILY_OF_KEYS.values()))
# Which models a text width belongs to, for messages.
WIDTH_FAMILIES = {64: "the offline demo model", 768: "SD 1.x", 1024: "SD 2.x"}
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
    """An embedding as read from (or to be written to) a file of any layout: a token's vectors
    for each text encoder of the model it was made for.

    `parts` maps each text encoder's key to its vectors [n, width] (float32, the same n in every
    part), in the family's `embedding_keys` order: SDXL clip_l, clip_g; SD 3.x clip_l, clip_g,
    t5; Flux.1 clip_l, t5 (whose t5 part is T5's width). A model with one text encoder (SD
    1.x/2.x) has a single part under ONE_ENCODER; give it as a bare tensor:

        EmbeddingFile("<my-cat>", vectors)                                 # SD 1.x/2.x
        EmbeddingFile("<my-cat>", {"clip_l": l, "clip_g": g, "t5": t5})   # SD 3.x
        EmbeddingFile.from_joined("<my-cat>", vectors, widths, family.embedding_keys, metadata)

    `vectors` is a one-encoder embedding's vectors; `joined()` lays every part side by side
    [n, sum of widths], as training holds them, and `from_joined` cuts such a tensor apart.
    Write it with write_embedding, read it with read_embedding.
    """

    token: str  # the name the file stores, or the file's name when its layout stores none
    parts: dict[str, torch.Tensor]  # {key: [n, width]}; a bare tensor is taken as {ONE_ENCODER: tensor}
    metadata: dict[str, str] = field(default_factory=dict)  # steps, base_model, init, method, ...
    layout: str = "diffusers"  # the layout it was read from
    path: Path | None = None  # the file it was read from

    def __post_init__(self):
        if isinstance(self.parts, torch.Tensor):
            self.parts = {ONE_ENCODER: self.parts}
        self.parts = dict(self.parts)
        keys = tuple(self.parts)
        if keys != (ONE_ENCODER,) and not families_holding(keys):
            known = "; ".join(f"{family.title}: {', '.join(k)}" for k, family in FAMILY_OF_KEYS.items())
            raise EmbeddingFormatError(f"{self.token!r}: parts {', '.join(keys) or 'none'} are no model family's text encoders ({known})")
        counts = {key: part.shape[0] for key, part in self.parts.items()}
        if len(set(counts.values())) != 1:
            raise EmbeddingFormatError(
                f"{self.token!r} holds a different number of vectors per text encoder "
                f"({', '.join(f'{k}: {n}' for k, n in counts.items())}); each encoder's part needs one vector per token vector"
            )

    @classmethod
    def from_joined(cls, token: str, vectors: torch.Tensor, widths: tuple[int, ...] | None = None,
                    keys: tuple[str, ...] = (), metadata: dict | None = None) -> EmbeddingFile:
        """An embedding from its parts side by side: `vectors` [n, sum(widths)], the parts of
        `widths` under the family's embedding `keys` in order (no keys: one text encoder)."""
        metadata = {k: str(v) for k, v in (metadata or {}).items() if v is not None}
        if not keys:
            return cls(token, vectors, metadata)
        widths = tuple(widths or ())
        if len(widths) != len(keys) or vectors.shape[-1] != sum(widths):
            raise ValueError(f"vectors of width {vectors.shape[-1]} do not split into parts {keys} of widths {widths}")
        return cls(token, dict(zip(keys, torch.split(vectors, list(widths), dim=-1))), metadata)

    @property
    def keys(self) -> tuple[str, ...]:
        """The parts' keys, as the family's embedding_keys: () for one text encoder."""
        return () if tuple(self.parts) == (ONE_ENCODER,) else tuple(self.parts)

    @property
    def vectors(self) -> torch.Tensor:
        """The vectors [n, width] of an embedding for one text encoder (use `parts` for several)."""
        if self.keys:
            raise EmbeddingFormatError(f"{self.token!r} has a part per text encoder ({', '.join(self.keys)}); take them from .parts")
        return self.parts[ONE_ENCODER]

    @property
    def count(self) -> int:
        """How many vectors the token has (in each part)."""
        return next(iter(self.parts.values())).shape[0]

    def joined(self) -> torch.Tensor:
        """Every part side by side, [n, sum of widths], in the keys' order."""
        return torch.cat(list(self.parts.values()), dim=1)

    @property
    def families(self) -> list:
        """The families (families.Family) it can be for: the one its metadata names (tinv-gui's
        files), else every family whose text encoders its parts' keys fit, a family with exactly
        these keys first ([] for one text encoder: its width tells SD 1.x from SD 2.x)."""
        named = FAMILY_NAMES.get(self.metadata.get(FAMILY_KEY, ""))
        candidates = families_holding(self.keys) if self.keys else []
        return [named] if named in candidates else candidates

    @property
    def family_title(self) -> str | None:
        """The family it was made for ('Stable Diffusion XL'), or the families it may be for
        ('Stable Diffusion XL, or Stable Diffusion 3 without its t5 part'); None for one text
        encoder."""
        if not self.families:
            return None
        return ", or ".join(f.title + (f" without its {' and '.join(missing)} part" if (missing := _missing(f, self.keys)) else "")
                            for f in self.families)

    @property
    def step(self) -> int | None:
        value = self.metadata.get("steps")
        return int(value) if value and value.isdigit() else None

    @property
    def widths(self) -> tuple[int, ...]:
        """The text encoder widths it was made for: (768,), (768, 1280) for SDXL, ..."""
        return tuple(part.shape[1] for part in self.parts.values())

    def describe_width(self) -> str:
        """'text width 768 (SD 1.x)', 'text widths 768 + 1280 (Stable Diffusion XL)', ..."""
        if len(self.widths) == 1 or not self.family_title:
            return describe_widths(self.widths)
        return f"text widths {' + '.join(str(w) for w in self.widths)} ({self.family_title})"


def families_holding(keys: tuple[str, ...]) -> list:
    """The families an embedding with parts under `keys` can be for: the family whose
    embedding_keys these are, then those whose files may leave some text encoders' parts out
    (Family.partial_embeddings: OneTrainer writes a part only for the text encoders it loaded)
    and hold the rest, in the order of their keys."""
    exact = [f for f in FAMILY_OF_KEYS.values() if f.embedding_keys == keys]
    partial = [f for f in FAMILY_OF_KEYS.values() if f.partial_embeddings and f not in exact and keys
               and [k for k in f.embedding_keys if k in keys] == list(keys)]
    return exact + partial


def _missing(family, keys: tuple[str, ...]) -> list[str]:
    return [key for key in family.embedding_keys if key not in keys]


def width_label(width: int) -> str:
    """'768 (SD 1.x)', or the bare number for a width no known family has."""
    family = WIDTH_FAMILIES.get(width)
    return f"{width} ({family})" if family else str(width)


def describe_widths(widths: tuple[int, ...], keys: tuple[str, ...] = ()) -> str:
    """'text width 768 (SD 1.x)', or 'text widths 768 + 1280 (Stable Diffusion XL)' for the
    parts of a family with several text encoders (named when its `keys` are given)."""
    if len(widths) == 1:
        return f"text width {width_label(widths[0])}"
    family = FAMILY_OF_KEYS.get(tuple(keys))
    return f"text widths {' + '.join(str(w) for w in widths)}" + (f" ({family.title})" if family else "")



def check_fits(embedding: EmbeddingFile, model_widths: int | tuple[int, ...], name: str = "the embedding", family=None) -> dict[str, torch.Tensor]:
    """The parts of `embedding` that go into a model with text encoders of `model_widths` (one
    width for SD 1.x/2.x); raises EmbeddingFormatError unless it was made for such a model.

    Without the model's `family` (families.Family) the embedding must hold a part for each of
    its text encoders. With it, the family decides what a file's keys mean: a file its metadata
    names another family for is refused; a family whose files may lack parts
    (Family.partial_embeddings: SD 3.x, Flux.1, as OneTrainer writes them without the text
    encoders it did not load) takes the parts present, {clip_l, clip_g} into SD 3.x's CLIPs as an
    SDXL model takes them, and a file holding clip_l alone into Flux.1's CLIP-L."""
    model_widths = (model_widths,) if isinstance(model_widths, int) else tuple(model_widths)
    parts = embedding.parts
    model_keys = family.embedding_keys if family is not None else ()
    if family is not None and family.partial_embeddings and embedding.layout == "clip_l":  # OneTrainer's Flux.1 file without T5
        parts = {"clip_l": embedding.vectors}
    if family is None:
        fits = embedding.widths == model_widths
    elif not model_keys:
        fits = embedding.widths == model_widths and not embedding.keys
    else:
        fits = family.name in {f.name for f in embedding.families or families_holding(tuple(parts))} and all(
            key in model_keys and part.shape[1] == model_widths[model_keys.index(key)] for key, part in parts.items()
        )
    if fits:
        return parts
    hint = ""
    per_encoder_files = len(model_widths) == 2 and (not model_keys or tuple(model_keys) in DIFFUSERS_FILE_PER_ENCODER)
    if per_encoder_files and embedding.widths in ((model_widths[0],), (model_widths[1],)):
        hint = (
            f" If it is the {'first' if embedding.widths[0] == model_widths[0] else 'second'} of diffusers' two SDXL files "
            "(learned_embeds.safetensors for the first text encoder, learned_embeds_2.safetensors for the second), "
            "give both files together (a second --embedding, or upload both)."
        )
    raise EmbeddingFormatError(
        f"{name} was made for a model with {embedding.describe_width()}; the chosen model has "
        f"{describe_widths(model_widths, model_keys) if len(model_widths) > 1 else width_label(model_widths[0])}. "
        "Use it with a model of the family it was made for, or train it again on this one." + hint
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
        and not first.keys
        and not second.keys
        and first.count == second.count
        and first.widths != second.widths  # SDXL's two encoders differ in width
    )


def join_sdxl_halves(first: EmbeddingFile, second: EmbeddingFile) -> EmbeddingFile:
    """One SDXL embedding from diffusers' two files (learned_embeds: first text encoder,
    learned_embeds_2: second), given in either order."""
    if first.path is not None and first.path.stem.endswith(SDXL_SECOND_FILE_SUFFIX):
        first, second = second, first
    names = " and ".join(e.path.name if e.path else e.token for e in (first, second))
    if first.keys or second.keys:
        raise EmbeddingFormatError(f"{names}: one of them already holds a part per text encoder ({', '.join(first.keys or second.keys)}); give that file alone")
    if first.count != second.count or first.token != second.token:
        raise EmbeddingFormatError(
            f"{names} are not the two halves of one SDXL embedding: they hold {first.token!r} ({first.count} vectors) "
            f"and {second.token!r} ({second.count} vectors). Give learned_embeds and learned_embeds_2 of the same training"
        )
    (keys,) = DIFFUSERS_FILE_PER_ENCODER
    metadata = {**second.metadata, **first.metadata, FAMILY_KEY: FAMILY_OF_KEYS[keys].name}  # only diffusers' SDXL script writes these
    return EmbeddingFile(first.token, dict(zip(keys, (first.vectors, second.vectors))), metadata, "diffusers-sdxl", first.path)


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
    for key, alias in COMFYUI_KEYS.items():  # a file made for ComfyUI alone may hold T5's part only as t5xxl
        if alias in tensors:
            tensors.setdefault(key, tensors.pop(alias))
    # A part per text encoder (OneTrainer's clip_l_out, t5_out, ... are output embeddings: not used).
    keys = tuple(key for key in ENCODER_KEYS if key in tensors)
    if keys and keys != ("clip_l",):  # clip_l alone: ComfyUI's name for SD 1.x's one part, read below
        families = families_holding(keys)
        if not families:
            family = min((f for k, f in FAMILY_OF_KEYS.items() if set(keys) <= set(k)), key=lambda f: len(f.embedding_keys))
            raise EmbeddingFormatError(
                f"{path.name} holds {' and '.join(keys)} without {' and '.join(_missing(family, keys))}: an embedding for "
                f"{family.title} holds {', '.join(family.embedding_keys)}, a part per text encoder. Use a file holding all of them"
            )
        parts = {key: _matrix(tensors[key], path, key) for key in keys}
        # The layout is named after the family its keys are all of (sdxl for clip_l + clip_g, whatever model it is for).
        return EmbeddingFile(own_token or path.stem, parts, metadata=extra, layout=families[0].name)
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
            "emp_params (OneTrainer), a part per text encoder (SDXL clip_l, clip_g; SD 3.x clip_l, clip_g, t5; Flux.1 clip_l, t5), "
            "or bundle_emb.<name>.* (a LoRA with an embedding)"
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


def write_embedding(embedding: EmbeddingFile, path: str | Path, fmt: str, picture=None, one_file: bool = False) -> Path:
    """Write `embedding` in layout `fmt` (one of FORMATS), atomically; returns the path. The one
    writer of every embedding file tinv-gui makes (embeddings.save_embedding writes runs through it).

    Layouts whose tools name an embedding after its file store the file's name as its name
    (A1111's `name`, the tensor's key), so every tool calls it by the same word. An embedding
    with a part per text encoder is written as {key: part} (SDXL {"clip_l", "clip_g"}, SD 3.x
    {"clip_l", "clip_g", "t5"}, Flux.1 {"clip_l", "t5"}), with the token in the metadata for
    diffusers; except that for SDXL diffusers' example writes a second file `<name>_2` beside the
    first, which `one_file` (a run's own file) leaves out. `picture` is a1111-png's preview."""
    path = Path(path)
    if fmt not in FORMATS:
        raise EmbeddingFormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path.suffix.lower() not in SUFFIXES[fmt]:
        raise EmbeddingFormatError(f"{fmt} files end in {' or '.join(SUFFIXES[fmt])}, not {path.name!r}")
    if not format_takes(fmt, embedding):
        raise EmbeddingFormatError(
            f"{fmt} files ({FORMATS[fmt]}) have no {embedding.families[0].title} embeddings: those tools do not load a T5 part. "
            f"Write it as {' or '.join(FORMATS_WITH_T5)} (ComfyUI reads the onetrainer file too)"
        )
    name = embedding.token if fmt == "diffusers" else path.stem
    if fmt == "a1111-png":
        from .cards import card_bytes, plain_picture

        data = card_bytes(_a1111_dict(embedding, name), picture if picture is not None else plain_picture(name))
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    if fmt == "diffusers" and _file_per_encoder(embedding) and not one_file:
        first, second = embedding.parts.values()
        _write_tensors({name: second}, path.with_name(path.stem + SDXL_SECOND_FILE_SUFFIX + path.suffix), _header(embedding, fmt, name))
        return _write_tensors({name: first}, path, _header(embedding, fmt, name))
    if embedding.keys:
        tensors = dict(embedding.parts)
        tensors.update({alias: embedding.parts[key].clone() for key, alias in COMFYUI_KEYS.items() if key in embedding.parts})
    elif fmt == "a1111-pt":
        return atomic_torch_save(_a1111_dict(embedding, name), path)
    else:
        key = {"kohya": KOHYA_KEY, "onetrainer": ONETRAINER_KEY}.get(fmt, name)
        tensors = {key: embedding.vectors}
    return _write_tensors(tensors, path, _header(embedding, fmt, name))


def _file_per_encoder(embedding: EmbeddingFile) -> bool:
    """Whether diffusers' files of `embedding` are one per text encoder (SDXL's, or clip_l +
    clip_g that may be SDXL's; not SD 3.x's, even without its T5 part)."""
    return bool(embedding.families) and embedding.families[0].embedding_keys in DIFFUSERS_FILE_PER_ENCODER


def format_takes(fmt: str, embedding: EmbeddingFile) -> bool:
    """Whether the tools of format `fmt` load `embedding`'s family (see FORMATS_WITH_T5): any
    format for a file that may be for a model without T5 (clip_l + clip_g without our metadata
    may be SDXL's), only FORMATS_WITH_T5 for one that is for SD 3.x or Flux.1 alone."""
    without_t5 = [f for f in embedding.families if f.t5_encoder is None]
    return fmt in FORMATS_WITH_T5 or not embedding.families or bool(without_t5)


def _write_tensors(tensors: dict, path: Path, header: dict[str, str]) -> Path:
    if path.suffix.lower() == ".safetensors":
        return atomic_save_safetensors(tensors, path, header)
    return atomic_torch_save({k: _cpu32(v) for k, v in tensors.items()}, path)  # .bin/.pt hold the tensors alone


def _header(embedding: EmbeddingFile, fmt: str, name: str) -> dict[str, str]:
    header = {k: str(v) for k, v in embedding.metadata.items() if v is not None and k != "stored_name"}
    header.update(format=fmt, token=name, vectors=str(embedding.count), dim="+".join(str(w) for w in embedding.widths))
    if len(embedding.families) == 1:  # known: say it, since the parts' keys alone may not (FAMILY_KEY)
        header[FAMILY_KEY] = embedding.families[0].name
    if fmt.startswith("a1111"):  # A1111's own field names, for tools that show them
        header["name"] = name
        if embedding.step is not None:
            header["step"] = str(embedding.step)
        if embedding.metadata.get("base_model"):
            header["sd_checkpoint_name"] = embedding.metadata["base_model"]
    return header


def _a1111_dict(embedding: EmbeddingFile, name: str) -> dict:
    if embedding.keys:  # A1111 reads SDXL as {clip_l, clip_g}, with nothing else beside them
        return {key: _cpu32(part) for key, part in embedding.parts.items()}
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
    """Write a finished run's embedding in every format whose tools load its family (SD 3.x and
    Flux.1: diffusers and onetrainer), one folder per format (A1111 would
    load a .pt and a .safetensors of the same name twice), under `out_dir`
    (default: an `export` folder beside the embedding). Returns {format: path}; "diffusers-bin"
    is diffusers' older learned_embeds.bin; for SDXL, "diffusers-2" (and "diffusers-bin-2")
    are the second files of diffusers' two-file layout. `picture` is the card's preview."""
    embedding = read_embedding(embedding_path)
    out_dir = Path(out_dir) if out_dir else Path(embedding_path).parent / "export"
    written = {
        fmt: str(write_embedding(embedding, out_dir / fmt / default_filename(embedding.token, fmt), fmt, picture))
        for fmt in FORMATS
        if format_takes(fmt, embedding)
    }
    written["diffusers-bin"] = str(write_embedding(embedding, out_dir / "diffusers" / "learned_embeds.bin", "diffusers"))
    if _file_per_encoder(embedding):
        for key in ("diffusers", "diffusers-bin"):
            first = Path(written[key])
            written[key + "-2"] = str(first.with_name(first.stem + SDXL_SECOND_FILE_SUFFIX + first.suffix))
    return written
