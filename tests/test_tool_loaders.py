"""Our files against what each tool's own loader checks, and files in every layout those tools
write read back with the same vectors and the name the tool uses.

Each loader's rules are written out here from the tool's code (AUTOMATIC1111 modules/safe.py and
textual_inversion.py, ComfyUI comfy/sd1_clip.py load_embed, kohya sd-scripts gen_img and
train_textual_inversion load_weights, InvokeAI's TI config probe and TextualInversionModelRaw,
OneTrainer's embedding saver/loader); the files from other tools are built here from their
published layouts. Vectors are 768 wide (SD 1.x) and 768 + 1280 (SDXL), several per token.
"""

import base64
import collections
import io
import json
import pickle
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from tinv_gui import formats
from tinv_gui.formats import (
    FAMILY_NAMES,
    EmbeddingFile,
    EmbeddingFormatError,
    read_embedding,
    write_embedding,
)

SD1 = EmbeddingFile("<my-cat>", torch.randn(3, 768, generator=torch.Generator().manual_seed(0)), metadata={"steps": "50"})
SDXL = EmbeddingFile("<my-cat>", {
    "clip_l": torch.randn(2, 768, generator=torch.Generator().manual_seed(1)), "clip_g": torch.randn(2, 1280, generator=torch.Generator().manual_seed(2)),
})
SD3 = EmbeddingFile("<my-cat>", {key: torch.randn(2, width, generator=torch.Generator().manual_seed(3 + i))
                                 for i, (key, width) in enumerate((("clip_l", 768), ("clip_g", 1280), ("t5", 4096)))})
FLUX = EmbeddingFile("<my-cat>", {"clip_l": SD3.parts["clip_l"], "t5": SD3.parts["t5"]})
# Every file the app offers: (format, file name).
OFFERED = [
    ("diffusers", "learned_embeds.safetensors"),
    ("diffusers", "learned_embeds.bin"),
    ("a1111-pt", "my-cat.pt"),
    ("a1111-safetensors", "my-cat.safetensors"),
    ("kohya", "my-cat.safetensors"),
    ("onetrainer", "my-cat.safetensors"),
    ("a1111-png", "my-cat.png"),
]


def first_part(embedding):
    """The vectors of the first text encoder (SD 1.x's only one; SDXL's clip_l)."""
    return next(iter(embedding.parts.values()))


def write(tmp_path, embedding, fmt, name):
    return write_embedding(embedding, tmp_path / fmt / name, fmt)


def plain_load(path: Path):
    """What a tool gets from the file: safetensors' load_file, or torch.load."""
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)


# ---- AUTOMATIC1111 / Forge -----------------------------------------------------------------

# modules/safe.py: the zip records it allows (its oldest list: a folder named 'archive';
# newer copies accept any folder name and also byteorder and .data/serialization_id).
A1111_ZIP_NAMES = re.compile(r"archive/((data/\d+)|version|(data\.pkl))")
# ...and the only globals its RestrictedUnpickler builds (those an embedding file can need).
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "float32"),
    ("torch.nn.modules.container", "ParameterDict"),
}


class A1111RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return None

    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return getattr(collections, name) if module == "collections" else (lambda *args: None)


def a1111_safe_check(path: Path) -> None:
    """Raise as A1111's check_pt would: a record it does not know, or a forbidden global."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bad = [n for n in names if not A1111_ZIP_NAMES.fullmatch(n)]
        if bad:
            raise ValueError(f"bad file inside {path.name}: {bad[0]}")
        (pickle_name,) = [n for n in names if n.endswith("/data.pkl")]
        A1111RestrictedUnpickler(io.BytesIO(archive.read(pickle_name))).load()


def a1111_vectors(data: dict):
    """create_embedding_from_data: string_to_param with exactly one entry, or clip_l + clip_g,
    or a dict of exactly one tensor ("diffuser concepts")."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        return next(iter(params.values())), None
    if "clip_g" in data and "clip_l" in data:
        assert all(isinstance(v, torch.Tensor) for v in data.values())  # it calls .detach() on every value
        return data["clip_l"], data["clip_g"]
    assert len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor), "embedding file has multiple terms in it"
    return next(iter(data.values())).reshape(-1, next(iter(data.values())).shape[-1]), None


@pytest.mark.parametrize("name", ["my-cat.pt", "learned_embeds.bin"])
def test_a1111_safe_unpickler_allows_our_torch_files_zip_names_and_globals(tmp_path, name):
    fmt = "a1111-pt" if name.endswith(".pt") else "diffusers"
    for embedding in (SD1, SDXL):
        path = write(tmp_path / str(bool(embedding.keys)), embedding, fmt, name)
        a1111_safe_check(path)
        vectors, vectors_g = a1111_vectors(torch.load(path, weights_only=True))
        assert torch.equal(vectors, first_part(embedding))
        if embedding.keys and fmt == "a1111-pt":
            assert torch.equal(vectors_g, embedding.parts["clip_g"])
    # The rule is real: the same dictionary saved by plain torch.save to a file is refused.
    torch.save(torch.load(path, weights_only=True), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="bad file inside plain.pt"):
        a1111_safe_check(tmp_path / "plain.pt")


@pytest.mark.parametrize(("fmt", "name"), [layout for layout in OFFERED if layout[0] != "diffusers"])
def test_a1111_reads_our_files_by_their_file_name_and_the_vectors_match(tmp_path, fmt, name):
    for embedding in (SD1, SDXL):
        path = write(tmp_path / str(bool(embedding.keys)), embedding, fmt, name)
        if fmt == "a1111-png":
            data = a1111_read_card(path)
            a1111_name = data.get("name", path.stem)  # cards: the name stored inside
        else:
            data = plain_load(path)
            a1111_name = path.stem  # everything else: the file's name
        vectors, vectors_g = a1111_vectors(data)
        assert torch.equal(vectors.float(), first_part(embedding))
        if embedding.keys:
            assert torch.equal(vectors_g.float(), embedding.parts["clip_g"])
        assert a1111_name == "my-cat" == read_embedding(path).token


def test_a1111_pt_in_the_wild_all_keys_and_renamed_by_the_user(tmp_path):
    vectors = SD1.vectors
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(True)}, "name": "a1111cat",
            "step": 1500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5-pruned"}
    torch.save(data, tmp_path / "renamed-by-user.pt")
    back = read_embedding(tmp_path / "renamed-by-user.pt")
    assert back.token == "renamed-by-user"  # A1111 types the file's name, not the stored 'a1111cat'
    assert torch.equal(back.vectors, vectors) and back.step == 1500
    assert (back.metadata["base_model"], back.metadata["sd_checkpoint"], back.metadata["stored_name"]) == ("v1-5-pruned", "7460a6fa", "a1111cat")
    torch.save({**data, "string_to_param": {"*": vectors, "**": vectors}}, tmp_path / "two.pt")
    with pytest.raises(EmbeddingFormatError, match="A1111 embedding holding 2 vectors sets.*exactly one"):
        read_embedding(tmp_path / "two.pt")


# A1111 modules/textual_inversion/image_embedding.py, as published: the card's two encodings.
def a1111_json(data) -> str:
    return json.dumps(data, default=lambda t: {"TORCHTENSOR": t.tolist()})


def a1111_lcg(count):
    values, seed = [], 0
    for _ in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        values.append(seed % 255)
    return np.array(values, dtype=np.uint8)


def a1111_in_pixels(picture: Image.Image, data: dict) -> Image.Image:
    """Written as A1111's insert_image_data_embed lays it out: its padding (the data repeated up
    to its size rule) and its 'style' dots in the high 4 bits, which a reader must ignore."""
    packed = np.frombuffer(zlib.compress(a1111_json(data).encode(), level=9), np.uint8)
    h, d = picture.height, 3
    size = len(packed) + (h - len(packed) % h)
    size += h * d - size % (h * d)
    blocks = []
    for nibbles in (packed & 0x0F, packed >> 4):
        block = np.resize(nibbles, size).reshape(h, -1, d)
        style = np.random.RandomState(len(blocks)).randint(0, 16, block.shape).astype(np.uint8) << 4
        mask = a1111_lcg(block.size).reshape(block.shape) & 0x0F
        blocks.append((block ^ style) ^ mask)
    low, high = (Image.fromarray(b.astype(np.uint8), "RGB") for b in blocks)
    card = Image.new("RGB", (picture.width + low.width + high.width + 2, h))
    card.paste(low, (0, 0))
    card.paste(picture, (low.width + 1, 0))
    card.paste(high, (low.width + 1 + picture.width + 1, 0))
    return card


def a1111_read_card(path: Path) -> dict:
    """A1111's reader: the sd-ti-embedding text when present, else the pixels."""
    def decode(text):
        return json.loads(text, object_hook=lambda d: torch.tensor(d["TORCHTENSOR"]) if "TORCHTENSOR" in d else d)

    image = Image.open(path)
    if "sd-ti-embedding" in getattr(image, "text", {}):
        return decode(base64.b64decode(image.text["sd-ti-embedding"]))
    pixels = np.array(image.convert("RGB"))
    lit = (pixels > 0).all(2)
    rows, cols = np.flatnonzero(lit.any(1)), np.flatnonzero(lit.any(0))
    pixels = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    black = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    assert len(black) >= 2
    low, high = pixels[:, : black.min()], pixels[:, black.max() + 1 :]
    low, high = (b ^ (a1111_lcg(b.size).reshape(b.shape) & 0x0F) for b in (low, high))
    return decode(zlib.decompress(((high << 4) | low).astype(np.uint8).tobytes()))


def test_a1111_cards_in_the_wild_text_chunk_pixels_and_webp(tmp_path):
    from conftest import make_picture

    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": SD1.vectors}, "name": "cardcat", "step": 300,
            "sd_checkpoint": None, "sd_checkpoint_name": "v1-5"}
    picture = make_picture(3, (128, 96))
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(a1111_json(data).encode()).decode())
    a1111_in_pixels(picture, data).save(tmp_path / "both.png", pnginfo=info)
    a1111_in_pixels(picture, data).save(tmp_path / "pixels.png")
    a1111_in_pixels(picture, data).save(tmp_path / "pixels.webp", lossless=True)
    picture.save(tmp_path / "text-only.png", pnginfo=info)
    for name in ("both.png", "pixels.png", "pixels.webp", "text-only.png"):
        back = read_embedding(tmp_path / name)
        assert (back.token, back.layout, back.step) == ("cardcat", "a1111-png", 300), name
        assert torch.equal(back.vectors, SD1.vectors), name
    picture.save(tmp_path / "holiday.png")
    with pytest.raises(EmbeddingFormatError, match="holiday.png: it is a picture without an embedding inside"):
        read_embedding(tmp_path / "holiday.png")


def test_our_card_is_read_by_a1111s_reader_from_its_text_and_from_its_pixels_alone(tmp_path):
    from conftest import make_picture

    path = write_embedding(SD1, tmp_path / "my-cat.png", "a1111-png", picture=make_picture(1, (160, 120)))
    from_text = a1111_read_card(path)
    Image.open(path).save(tmp_path / "stripped.png")  # a tool that drops text chunks keeps the pixels
    assert "sd-ti-embedding" not in Image.open(tmp_path / "stripped.png").text
    from_pixels = a1111_read_card(tmp_path / "stripped.png")
    for data in (from_text, from_pixels):
        assert data["name"] == "my-cat" and data["step"] == 50
        assert torch.equal(data["string_to_param"]["*"].float(), SD1.vectors)
    assert torch.equal(read_embedding(tmp_path / "stripped.png").vectors, SD1.vectors)
    assert Image.open(path).height == 120  # the preview keeps its size; the data frames it


# ---- ComfyUI -------------------------------------------------------------------------------


def comfyui_load_embed(folder: Path, typed: str, embed_key: str):
    """comfy/sd1_clip.py load_embed: `embedding:<typed>` finds <typed>, or <typed> plus
    .safetensors/.pt/.bin; then string_to_param's first tensor, else `embed_key` (clip_l, or
    clip_g for SDXL's second encoder) when present, else the file's first tensor."""
    path = next((p for p in (folder / typed, *(folder / (typed + s) for s in (".safetensors", ".pt", ".bin"))) if p.is_file()), None)
    if path is None:
        return None
    embed = plain_load(path)
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if embed_key in embed:
        return embed[embed_key]
    return next(iter(embed.values()))


@pytest.mark.parametrize(("fmt", "name"), [layout for layout in OFFERED if layout[0] not in ("diffusers", "a1111-png")])
def test_comfyui_key_lookup_finds_our_vectors_under_the_name_we_show(tmp_path, fmt, name):
    for embedding in (SD1, SDXL):
        path = write(tmp_path / str(bool(embedding.keys)), embedding, fmt, name)
        typed = read_embedding(path).token
        assert torch.equal(comfyui_load_embed(path.parent, typed, "clip_l"), first_part(embedding))
        if embedding.keys:
            assert torch.equal(comfyui_load_embed(path.parent, typed, "clip_g"), embedding.parts["clip_g"])


# ComfyUI's text encoders for SD 3.x and Flux.1 (comfy/text_encoders/sd3_clip.py, flux.py): an
# SDTokenizer per encoder, each calling load_embed with its embedding_key and width: clip_l 768,
# clip_g 1280, and T5-XXL's 't5xxl' 4096; a tensor of another width is dropped with a warning
# (sd1_clip.py set_up_textual_embeddings: "shape mismatch ... embedding will be ignored").
COMFYUI_ENCODERS = (("clip_l", "clip_l", 768), ("clip_g", "clip_g", 1280), ("t5", "t5xxl", 4096))


def test_comfyui_gives_each_sd3_and_flux_encoder_its_own_part_of_our_file(tmp_path):
    for embedding in (SD3, FLUX):
        path = write(tmp_path / "-".join(embedding.keys), embedding, "onetrainer", "my-cat.safetensors")
        typed = read_embedding(path).token
        assert typed == "my-cat"  # `embedding:my-cat`
        for key, comfy_key, width in COMFYUI_ENCODERS:
            if key in embedding.parts:
                found = comfyui_load_embed(path.parent, typed, comfy_key)
                assert found.shape[-1] == width and torch.equal(found, embedding.parts[key]), key
    # OneTrainer's own file has no 't5xxl': ComfyUI's T5 takes the first tensor, CLIP-L's, and drops it for its width.
    save_file({"clip_l": FLUX.parts["clip_l"], "t5": FLUX.parts["t5"]}, tmp_path / "ot.safetensors")
    assert comfyui_load_embed(tmp_path, "ot", "t5xxl").shape[-1] == 768
    save_file({"clip_l": FLUX.parts["clip_l"], "t5xxl": FLUX.parts["t5"]}, tmp_path / "comfy.safetensors")  # T5's part under ComfyUI's key alone
    assert torch.equal(read_embedding(tmp_path / "comfy.safetensors").parts["t5"], FLUX.parts["t5"])


# ---- kohya sd-scripts ----------------------------------------------------------------------


def kohya_vectors(path: Path, sdxl: bool):
    """gen_img's --textual_inversion_embeddings and train_textual_inversion's --weights: the
    first tensor (inside string_to_param for A1111 files); clip_l and clip_g for SDXL."""
    data = plain_load(path)
    if "string_to_param" in data:
        data = data["string_to_param"]
    if sdxl:
        return data["clip_l"], data["clip_g"]
    first = next(iter(data.values()))
    assert isinstance(first, torch.Tensor), "weight file does not contains Tensor"
    return first.reshape(-1, first.shape[-1]), None


@pytest.mark.parametrize(("fmt", "name"), [("kohya", "my-cat.safetensors"), ("a1111-pt", "my-cat.pt"), ("onetrainer", "my-cat.safetensors")])
def test_kohya_key_names_and_its_file_name_tokens(tmp_path, store, fmt, name):
    tokenizer = store.pipeline("demo").tokenizer  # CLIP's own vocabulary
    for embedding in (SD1, SDXL):
        path = write(tmp_path / str(bool(embedding.keys)), embedding, fmt, name)
        vectors, vectors_g = kohya_vectors(path, bool(embedding.keys))
        assert torch.equal(vectors, first_part(embedding))
        if embedding.keys:
            assert torch.equal(vectors_g, embedding.parts["clip_g"])
        # gen_img adds <file name>, <file name>1, ... and requires each to be new to the tokenizer.
        stem = path.stem
        assert stem == read_embedding(path).token
        assert not {stem, *(f"{stem}{i}" for i in range(1, len(vectors)))} & set(tokenizer.get_vocab())
    if fmt == "kohya":  # its own key, which InvokeAI's probe and loader look for as well
        assert set(load_file(str(path))) == {"clip_l", "clip_g"} and set(load_file(str(write(tmp_path, SD1, fmt, name)))) == {"emb_params"}


# ---- InvokeAI ------------------------------------------------------------------------------

INVOKEAI_BASES = {768: "sd-1", 1024: "sd-2", 1280: "sdxl"}


def invokeai_probe(path: Path) -> str:
    """The TI config probe: the width from string_to_param (when string_to_token is there),
    emb_params or clip_g along the last dimension, else the first tensor's FIRST dimension."""
    state = plain_load(path)
    if "string_to_token" in state:
        width = list(state["string_to_param"].values())[0].shape[-1]
    elif "emb_params" in state:
        width = state["emb_params"].shape[-1]
    elif "clip_g" in state:
        width = state["clip_g"].shape[-1]
    else:
        width = list(state.values())[0].shape[0]
    if width not in INVOKEAI_BASES:
        raise ValueError(f"unrecognized token dimension {width}")
    return INVOKEAI_BASES[width]


def invokeai_loader(path: Path):
    """TextualInversionModelRaw.from_checkpoint: which tensors InvokeAI splices in."""
    state = plain_load(path)
    if "string_to_param" in state:
        return next(iter(state["string_to_param"].values())), None
    if "emb_params" in state:
        return state["emb_params"], None
    if "clip_g" in state and "clip_l" in state:
        return state["clip_l"], state["clip_g"]
    return next(iter(state.values())), None


@pytest.mark.parametrize(("fmt", "name"), [("kohya", "my-cat.safetensors"), ("a1111-pt", "my-cat.pt")])
def test_invokeai_probe_reads_the_width_of_the_files_we_give_it(tmp_path, fmt, name):
    for embedding, base in ((SD1, "sd-1"), (SDXL, "sdxl")):
        path = write(tmp_path / base, embedding, fmt, name)
        assert invokeai_probe(path) == base
        vectors, vectors_g = invokeai_loader(path)
        assert torch.equal(vectors, first_part(embedding))
        if embedding.keys:
            assert torch.equal(vectors_g, embedding.parts["clip_g"])
        assert read_embedding(path).token == "my-cat"  # installed under its file's name, typed <my-cat>


def test_invokeai_probe_reads_the_vector_count_of_a_single_key_file_as_its_width_so_it_gets_the_kohya_file(tmp_path):
    path = write(tmp_path, SD1, "a1111-safetensors", "my-cat.safetensors")
    with pytest.raises(ValueError, match="unrecognized token dimension 3"):
        invokeai_probe(path)
    assert "InvokeAI" in formats.FORMATS["kohya"] and "InvokeAI" not in formats.FORMATS["a1111-safetensors"]


# ---- OneTrainer ----------------------------------------------------------------------------


def test_onetrainer_reads_emp_params_and_clip_l_clip_g_from_our_file(tmp_path):
    path = write(tmp_path, SD1, "onetrainer", "my-cat.safetensors")
    state = load_file(str(path))
    assert set(state) == {"emp_params"}  # its loader takes emp_params_out when present, else emp_params
    assert torch.equal(state.get("emp_params_out", state["emp_params"]), SD1.vectors)
    state = load_file(str(write(tmp_path / "xl", SDXL, "onetrainer", "my-cat.safetensors")))
    assert set(state) == {"clip_l", "clip_g"} and torch.equal(state["clip_g"], SDXL.parts["clip_g"])


def test_onetrainer_reads_each_encoders_part_of_our_sd3_and_flux_files(tmp_path):
    """BaseStableDiffusion3Setup / BaseFluxSetup: per encoder, state.get(key + "_out", state.get(key))."""
    for embedding in (SD3, FLUX):
        state = load_file(str(write(tmp_path / "-".join(embedding.keys), embedding, "onetrainer", "my-cat.safetensors")))
        assert set(embedding.keys) <= set(state) and not any(key.endswith("_out") for key in state)
        for key in embedding.keys:
            assert torch.equal(state.get(key + "_out", state.get(key)), embedding.parts[key]), key
    # Files OneTrainer wrote, with output embeddings beside the input vectors: the input vectors are read.
    save_file({"clip_l": FLUX.parts["clip_l"], "t5": FLUX.parts["t5"], "clip_l_out": torch.randn(2, 768), "t5_out": torch.randn(2, 4096)},
              tmp_path / "otflux.safetensors")
    back = read_embedding(tmp_path / "otflux.safetensors")
    assert (back.token, back.keys, back.layout) == ("otflux", ("clip_l", "t5"), "flux")
    assert torch.equal(back.parts["t5"], FLUX.parts["t5"])
    save_file(dict(SD3.parts), tmp_path / "otsd3.safetensors")
    assert read_embedding(tmp_path / "otsd3.safetensors").widths == (768, 1280, 4096)
    # OneTrainer writes a part only for the text encoders it loaded: such a file is SD 3.x's.
    save_file({"clip_g": SD3.parts["clip_g"], "t5": SD3.parts["t5"]}, tmp_path / "not-all.safetensors")
    back = read_embedding(tmp_path / "not-all.safetensors")
    assert back.keys == ("clip_g", "t5") and [f.name for f in back.families] == ["sd3"]
    assert "Stable Diffusion 3 without its clip_l part" in back.describe_width()


def test_tools_without_sd3_and_flux_embeddings_are_not_offered_them(tmp_path):
    """A1111/Forge, kohya sd-scripts and InvokeAI load no embedding with a T5 part."""
    for fmt, name in OFFERED:
        if fmt in ("diffusers", "onetrainer"):
            assert read_embedding(write(tmp_path, FLUX, fmt, name)).keys == ("clip_l", "t5")
        else:
            with pytest.raises(EmbeddingFormatError, match=r"have no Flux.1 embeddings.*Write it as diffusers or onetrainer"):
                write(tmp_path, FLUX, fmt, name)
            assert not (tmp_path / fmt / name).exists()


def test_onetrainer_files_in_the_wild(tmp_path):
    out_vectors = torch.randn(3, 768)
    save_file({"emp_params": SD1.vectors.half(), "emp_params_out": out_vectors}, tmp_path / "otcat.safetensors")
    back = read_embedding(tmp_path / "otcat.safetensors")
    assert (back.token, back.layout) == ("otcat", "onetrainer")  # the input vectors; _out is an output embedding
    assert torch.equal(back.vectors, SD1.vectors.half().float())
    save_file({"clip_l": SDXL.parts["clip_l"], "clip_g": SDXL.parts["clip_g"], "clip_l_out": torch.randn(2, 768), "clip_g_out": torch.randn(2, 1280)},
              tmp_path / "otxl.safetensors")
    back = read_embedding(tmp_path / "otxl.safetensors")
    assert back.token == "otxl" and torch.equal(back.parts["clip_l"], SDXL.parts["clip_l"]) and torch.equal(back.parts["clip_g"], SDXL.parts["clip_g"])
    save_file({"emp_params_out": out_vectors}, tmp_path / "outonly.safetensors")
    with pytest.raises(EmbeddingFormatError, match="only emp_params_out, a OneTrainer output embedding.*saved as emp_params"):
        read_embedding(tmp_path / "outonly.safetensors")


# ---- other layouts in the wild -------------------------------------------------------------


def test_lora_bundled_embeddings_are_read_under_the_bundle_name(tmp_path):
    lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}
    save_file({**lora, "bundle_emb.loracat.clip_l": SD1.vectors, "bundle_emb.loracat.clip_l_out": torch.zeros(3, 768)}, tmp_path / "ot.safetensors")
    save_file({**lora, "bundle_emb.a1cat.string_to_param.*": SD1.vectors}, tmp_path / "a1.safetensors")
    save_file({**lora, "bundle_emb.xlcat.clip_l": SDXL.parts["clip_l"], "bundle_emb.xlcat.clip_g": SDXL.parts["clip_g"]}, tmp_path / "xl.safetensors")
    for name, token in (("ot", "loracat"), ("a1", "a1cat")):
        back = read_embedding(tmp_path / f"{name}.safetensors")
        assert (back.token, back.layout) == (token, "lora-bundle") and torch.equal(back.vectors, SD1.vectors)
    back = read_embedding(tmp_path / "xl.safetensors")
    assert back.token == "xlcat" and torch.equal(back.parts["clip_g"], SDXL.parts["clip_g"])
    save_file({**lora, "bundle_emb.one.clip_l": SD1.vectors, "bundle_emb.two.clip_l": SD1.vectors.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingFormatError, match=r"a LoRA with 2 embeddings bundled in it \(one, two\)"):
        read_embedding(tmp_path / "two.safetensors")


def test_sd_concepts_bin_kohya_pt_and_a_lone_clip_g(tmp_path):
    torch.save({"<cat-toy>": SD1.vectors[0]}, tmp_path / "learned_embeds.bin")  # sd-concepts-library: one 1-D vector
    back = read_embedding(tmp_path / "learned_embeds.bin")
    assert back.token == "<cat-toy>" and torch.equal(back.vectors, SD1.vectors[:1])
    torch.save({"emb_params": SD1.vectors}, tmp_path / "kohyacat.pt")  # kohya's --save_model_as pt
    assert read_embedding(tmp_path / "kohyacat.pt").token == "kohyacat"
    save_file({"clip_l": SD1.vectors}, tmp_path / "lonel.safetensors")  # ComfyUI reads clip_l for SD 1.x
    assert read_embedding(tmp_path / "lonel.safetensors").widths == (768,)
    save_file({"clip_g": SDXL.parts["clip_g"]}, tmp_path / "loneg.safetensors")  # SD 3.x's, as OneTrainer writes it with bigG alone
    lone = read_embedding(tmp_path / "loneg.safetensors")
    assert [f.name for f in lone.families] == ["sd3"]
    with pytest.raises(EmbeddingFormatError, match="If it is the second of diffusers' two SDXL files"):  # not SDXL's
        formats.check_fits(lone, (768, 1280), "loneg.safetensors", FAMILY_NAMES["sdxl"])
