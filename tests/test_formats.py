"""Embedding files: every layout read back exactly, read by diffusers, refused when unsafe or the wrong width."""

import itertools
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import cli_here
from safetensors.torch import save_file

from tinv_gui import formats
from tinv_gui.embeddings import load_into_pipeline, save_embedding, unload_from_pipeline
from tinv_gui.formats import (
    EmbeddingFile,
    EmbeddingFormatError,
    check_fits,
    read_embedding,
    write_embedding,
)

# Every file layout the app writes: (format, file name).
LAYOUTS = [
    ("diffusers", "learned_embeds.safetensors"),
    ("diffusers", "learned_embeds.bin"),
    ("a1111-pt", "my-cat.pt"),
    ("a1111-safetensors", "my-cat.safetensors"),
    ("kohya", "my-cat.safetensors"),
]


def odd_vectors(n=3, dim=64, seed=0):
    """Values that a lossy conversion would change: tiny, huge, negative zero, many digits."""
    vectors = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    vectors[0, :4] = torch.tensor([1e-30, -3.4e38, -0.0, 1 / 3])
    return vectors


def embedding(n=3, dim=64):
    return EmbeddingFile("<my-cat>", odd_vectors(n, dim), metadata={"steps": "120", "base_model": "demo", "init": "cat"})


def name_to_type(fmt: str, file_name: str, token: str) -> str:
    """The one naming rule: diffusers calls an embedding by its tensor's key (the token), the
    other tools by the file's name."""
    return token if fmt == "diffusers" else Path(file_name).stem


@pytest.mark.parametrize(("source", "target"), list(itertools.product(LAYOUTS, LAYOUTS)), ids=lambda layout: f"{layout[0]}:{Path(layout[1]).suffix}")
def test_conversion_between_every_pair_of_layouts_keeps_vectors_and_names_as_the_target_tool(tmp_path, source, target):
    original = embedding()
    first = write_embedding(original, tmp_path / "a" / source[1], source[0])
    assert read_embedding(first).token == name_to_type(source[0], source[1], "<my-cat>")
    second = formats.convert(first, target[0], tmp_path / "b" / target[1])
    back = read_embedding(second)
    assert torch.equal(back.vectors, original.vectors)
    assert back.vectors.dtype == torch.float32
    assert back.token == name_to_type(target[0], target[1], read_embedding(first).token)
    if ".bin" not in (Path(source[1]).suffix, Path(target[1]).suffix):  # diffusers' .bin holds one tensor, nothing else
        assert back.step == 120


def test_sdxl_layout_keeps_both_encoders_in_every_container(tmp_path):
    original = EmbeddingFile("<x>", {"clip_l": odd_vectors(2, 768), "clip_g": odd_vectors(2, 1280, seed=1)})
    for fmt, name in LAYOUTS[2:] + [("onetrainer", "x.safetensors"), ("a1111-png", "x.png")]:
        back = read_embedding(write_embedding(original, tmp_path / fmt / name, fmt))
        assert back.keys == ("clip_l", "clip_g") and back.token == Path(name).stem
        assert all(torch.equal(back.parts[key], original.parts[key]) for key in back.keys)
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):  # diffusers' SDXL example: two files
        first = write_embedding(original, tmp_path / "diffusers" / name, "diffusers")
        second = first.with_name(first.stem + "_2" + first.suffix)
        assert [t.shape[1] for t in (read_embedding(first).vectors, read_embedding(second).vectors)] == [768, 1280]
        for pair in ([first, second], [second, first]):  # either order
            (back,) = formats.read_embeddings(pair)
            assert back.keys == ("clip_l", "clip_g") and back.token == "<x>"
            assert all(torch.equal(back.parts[key], original.parts[key]) for key in back.keys)
        assert torch.equal(read_embedding(first, second).parts["clip_g"], original.parts["clip_g"])


def test_files_from_other_tools_are_recognised(tmp_path):
    vectors = odd_vectors(2)
    save_file({"emb_params": vectors.half()}, tmp_path / "kohya-style.safetensors")  # no metadata at all
    torch.save({"<tok>": vectors[0]}, tmp_path / "learned_embeds.bin")  # one vector, saved 1-D
    torch.save(vectors, tmp_path / "bare.pt")
    # The original textual inversion code saved an nn.ParameterDict.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, tmp_path / "ldm.pt")

    kohya = read_embedding(tmp_path / "kohya-style.safetensors")
    assert (kohya.layout, kohya.token) == ("kohya", "kohya-style")  # kohya, A1111 and ComfyUI name it after the file
    assert torch.equal(kohya.vectors, vectors.half().float())
    single = read_embedding(tmp_path / "learned_embeds.bin")
    assert single.token == "<tok>" and single.vectors.shape == (1, 64)
    assert read_embedding(tmp_path / "bare.pt").token == "bare"
    ldm = read_embedding(tmp_path / "ldm.pt")
    assert ldm.layout == "a1111-pt" and torch.equal(ldm.vectors, vectors)


def test_a1111_pt_holds_webui_fields(tmp_path):
    path = write_embedding(embedding(), tmp_path / "my-cat.pt", "a1111-pt")
    data = torch.load(path, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and list(data["string_to_param"]) == ["*"]
    assert (data["name"], data["step"], data["sd_checkpoint_name"]) == ("my-cat", 120, "demo")  # the file's name, as A1111 calls it


@pytest.mark.parametrize(("fmt", "name", "token"), [
    ("diffusers", "learned_embeds.safetensors", None),
    ("diffusers", "learned_embeds.bin", None),
    ("a1111-pt", "my-cat.pt", None),
    ("a1111-safetensors", "my-cat.safetensors", None),
    ("kohya", "my-cat.safetensors", "my-cat"),  # the layout has no name: diffusers needs token=
])
def test_diffusers_load_textual_inversion_reads_our_files_under_the_same_name_as_the_other_tools(tmp_path, store, fmt, name, token):
    pipe = store.pipeline("demo")
    vectors = torch.randn(2, 64)
    path = write_embedding(EmbeddingFile("<my-cat>", vectors), tmp_path / name, fmt)
    expected = name_to_type(fmt, name, "<my-cat>")
    assert read_embedding(path).token == expected
    names = [expected, f"{expected}_1"]
    try:
        pipe.load_textual_inversion(str(path), token=token)
        ids = pipe.tokenizer.convert_tokens_to_ids(names)
        table = pipe.text_encoder.get_input_embeddings().weight
        assert torch.equal(table[ids], vectors)
    finally:
        unload_from_pipeline(pipe, names)
    assert len(pipe.tokenizer) == 49408
    assert not pipe.text_encoder.get_input_embeddings().weight.requires_grad


def test_diffusers_loads_our_sdxl_two_files_into_each_text_encoder(tmp_path, store):
    from tinv_gui.demo_model import SDXL_TEXT_WIDTHS

    pipe = store.pipeline("demo-sdxl")
    original = EmbeddingFile("<xl>", {"clip_l": torch.randn(2, SDXL_TEXT_WIDTHS[0]), "clip_g": torch.randn(2, SDXL_TEXT_WIDTHS[1])})
    first = write_embedding(original, tmp_path / "learned_embeds.safetensors", "diffusers")
    second = tmp_path / "learned_embeds_2.safetensors"
    names = ["<xl>", "<xl>_1"]
    try:  # as diffusers documents for SDXL: each file into its own text encoder
        pipe.load_textual_inversion(str(first), tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.load_textual_inversion(str(second), tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
        for tokenizer, encoder, vectors in ((pipe.tokenizer, pipe.text_encoder, original.parts["clip_l"]), (pipe.tokenizer_2, pipe.text_encoder_2, original.parts["clip_g"])):
            assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names)], vectors)
    finally:
        unload_from_pipeline(pipe, names)


def test_wrong_width_is_explained(tmp_path, store):
    sd2 = save_embedding(tmp_path / "sd2.safetensors", "<x>", torch.randn(1, 1024))
    with pytest.raises(EmbeddingFormatError) as error:
        check_fits(read_embedding(sd2), 768, sd2.name)
    assert "made for a model with text width 1024 (SD 2.x); the chosen model has 768 (SD 1.x)" in str(error.value)
    assert "sd2.safetensors" in str(error.value)

    sdxl = write_embedding(EmbeddingFile("<x>", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}), tmp_path / "xl.safetensors", "kohya")
    with pytest.raises(EmbeddingFormatError, match=r"text widths 768 \+ 1280 \(Stable Diffusion XL, or Stable Diffusion 3 without its t5 part\); the chosen model has 768 \(SD 1.x\)"):
        check_fits(read_embedding(sdxl), 768, sdxl.name)

    pipe = store.pipeline("demo")
    with pytest.raises(EmbeddingFormatError, match=r"text width 768 \(SD 1.x\); the chosen model has 64 \(the offline demo model\)"):
        load_into_pipeline(pipe, "<x>", torch.randn(1, 768))
    assert len(pipe.tokenizer) == 49408  # refused before anything was added


class RunsCode:
    """Unpickling this runs `exec` on a line of code: what a malicious embedding file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "code-ran"
    payload = {"string_to_param": {"*": torch.zeros(1, 64)}, "name": RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if container == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(EmbeddingFormatError, match="could run code"):
        read_embedding(path)
    assert not marker.exists()

    # The file really is dangerous: an unrestricted load runs its code.
    torch.load(path, weights_only=False) if container == "zip" else pickle.loads(path.read_bytes())
    assert marker.exists()


def test_unreadable_files_get_a_message(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingFormatError, match="neither a .safetensors, a PyTorch .pt/.bin file nor an A1111 .png/.webp"):
        read_embedding(tmp_path / "notes.pt")
    with pytest.raises(EmbeddingFormatError, match="holds 2 tensors .* none of the keys of an embedding layout"):
        read_embedding(tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingFormatError, match="does not exist"):
        read_embedding(tmp_path / "missing.pt")


def test_failed_pt_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_embedding(embedding(), tmp_path / "my-cat.pt", "a1111-pt")
    before = path.read_bytes()

    real_write_bytes = Path.write_bytes

    def crash(self, data):
        real_write_bytes(self, data[:9])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        write_embedding(EmbeddingFile("<other>", torch.ones(1, 64)), path, "a1111-pt")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["my-cat.pt"]  # no temporary file left behind


def test_export_all_writes_every_format_a_tool_can_pick_up(tmp_path):
    source = save_embedding(tmp_path / "run" / "learned_embeds.safetensors", "<my-cat>", odd_vectors(), {"steps": 7})
    written = formats.export_all(source)
    assert set(written) == {"diffusers", "diffusers-bin", "a1111-pt", "a1111-safetensors", "kohya", "onetrainer", "a1111-png"}
    assert Path(written["a1111-pt"]).name == "my-cat.pt"  # the word A1111 users type
    for fmt, path in written.items():
        assert read_embedding(path).token == ("<my-cat>" if fmt.startswith("diffusers") else "my-cat")
        assert Path(path).parent.parent == tmp_path / "run" / "export"
        assert torch.equal(read_embedding(path).vectors, odd_vectors())
        assert oct(Path(path).stat().st_mode & 0o777) == oct(0o644)  # shareable, not private


def test_convert_command(tmp_path, capsys):
    source = save_embedding(tmp_path / "learned_embeds.safetensors", "<my-cat>", odd_vectors())
    out = tmp_path / "a1111"
    out.mkdir()
    done = cli_here(capsys, "convert", str(source), "--format", "a1111-pt", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert str(out / "my-cat.pt") in done.stdout
    back = read_embedding(out / "my-cat.pt")
    assert back.layout == "a1111-pt" and back.token == "my-cat" and torch.equal(back.vectors, odd_vectors())

    from tinv_gui.cli import main

    assert main(["convert", str(source), "--format", "kohya", "--output", str(tmp_path / "x.pt")]) == 2

    # diffusers' SDXL output: both files in, one card out, with the picture given.
    from conftest import make_picture

    xl = EmbeddingFile("<xl>", {"clip_l": odd_vectors(2, 768), "clip_g": odd_vectors(2, 1280, seed=1)})
    first = write_embedding(xl, tmp_path / "xl" / "learned_embeds.safetensors", "diffusers")
    make_picture(0).save(tmp_path / "preview.png")
    assert main(["convert", str(first), str(first.with_name("learned_embeds_2.safetensors")), "--format", "a1111-png",
                 "--picture", str(tmp_path / "preview.png"), "--output", str(tmp_path / "card.png")]) == 0
    card = read_embedding(tmp_path / "card.png")
    assert card.token == "card" and torch.equal(card.parts["clip_g"], xl.parts["clip_g"])
    assert main(["convert", str(first), "--format", "a1111-pt", "--output", str(tmp_path / "half.pt")]) == 0  # SD 1.x-wide: a valid file of its own
