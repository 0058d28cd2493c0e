"""New tokens: naming, validating, initializing, splicing into a text encoder, saving.

Only the new vectors are trainable: the text encoder keeps its frozen token table, and a thin
module looks up ids past its end in a small [n, dim] parameter. No gradient or optimizer state
ever touches the 49408-row vocabulary, and there is nothing to restore after a step.

A model with several text encoders (SDXL, SD 3.x, Flux.1) has a token's vectors for each (SDXL:
[n, 768] and [n, 1280]). They are trained as one tensor [n, 768 + 1280], the first encoder's
columns first, so the optimizer, the NaN guard and checkpoints see one tensor whatever the model;
`split_columns` cuts it apart, and files hold a part per encoder (formats.EmbeddingFile).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from pathlib import Path

import torch

from .formats import (
    FAMILY_KEY,
    FAMILY_OF_KEYS,
    EmbeddingFile,
    check_fits,
    write_embedding,
)

MAX_TOKEN_LENGTH = 64
_FORBIDDEN_IN_TOKEN = re.compile(r"[\s/\\\x00]|\.\.")


class TokenError(ValueError):
    """The placeholder token or the initializer cannot be used; the message says why."""


def token_names(token: str, count: int) -> list[str]:
    """The names of a token's vectors, as diffusers expands them: token, token_1, token_2, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def validate_token(token: str, tokenizer) -> str:
    """Check a placeholder token: not empty, no spaces or path characters, not an existing word."""
    token = (token or "").strip()
    if not token:
        raise TokenError("the token is empty: type a made-up word such as <my-cat>")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"the token is {len(token)} characters long; keep it under {MAX_TOKEN_LENGTH}")
    if _FORBIDDEN_IN_TOKEN.search(token):
        raise TokenError(f"the token {token!r} contains spaces, '/', '\\', '..' or NUL; use letters, digits, '-', '<' and '>'")
    vocab = tokenizer.get_vocab()
    if token in vocab or token.lower() + "</w>" in vocab:
        raise TokenError(
            f"{token!r} is already a word the model knows; training it would change that word everywhere. "
            f"Use a made-up token such as <{token}-concept>"
        )
    return token


def tokenize_words(tokenizer, text: str) -> list[int]:
    """Token ids of plain text, without start/end markers."""
    return tokenizer(text, add_special_tokens=False).input_ids


def initial_vectors(
    embedding_table: torch.Tensor, tokenizer, init: str | None, count: int, seed: int = 0, first_tokenizer=None
) -> torch.Tensor:
    """Starting vectors [count, dim] in float32.

    From a word or phrase: one vector takes the mean of its tokens' embeddings; several vectors
    take its tokens in turn (so a caption of n tokens gives each vector its own word). Vector i
    stands for `first_tokenizer`'s token i (the pipeline's first, CLIP's): where this tokenizer
    splits the phrase otherwise (T5's sentencepiece), vector i starts from the mean of this
    tokenizer's pieces of that token's text, so every encoder's part starts on the same word.
    With no initializer, random vectors with the table's own spread.
    """
    if count < 1:
        raise TokenError("the number of vectors must be at least 1")
    table = embedding_table.detach().float()
    if init is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, table.shape[1], generator=generator) * table.std() + table.mean(0)
    ids = tokenize_words(tokenizer, init.strip()) if init.strip() else []
    if not ids:
        raise TokenError(f"the initializer {init!r} has no words in it: type a word close to the concept, like 'dog' or 'painting'")
    vectors = table[torch.tensor(ids)].cpu()
    if count == 1:
        return vectors.mean(0, keepdim=True).clone()
    first_ids = tokenize_words(first_tokenizer, init.strip()) if first_tokenizer is not None else ids
    if first_tokenizer is not None and first_tokenizer.convert_ids_to_tokens(first_ids) != tokenizer.convert_ids_to_tokens(ids):
        units = [first_tokenizer.decode([i]) for i in first_ids]
        # A unit this tokenizer finds nothing in (whitespace alone) starts from the whole phrase.
        vectors = torch.stack([table[tokenize_words(tokenizer, unit) or ids].cpu().mean(0) for unit in units])
    return vectors[torch.arange(count) % len(vectors)].clone()


def split_columns(vectors: torch.Tensor, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """Each text encoder's part of a token's vectors [n, sum(widths)], in order."""
    if vectors.shape[-1] != sum(widths):
        raise ValueError(f"vectors of width {vectors.shape[-1]} do not split into text encoders of widths {widths}")
    return list(torch.split(vectors, list(widths), dim=-1))


class ExtendedTokenEmbedding(torch.nn.Module):
    """A frozen token table plus new rows: ids below the table's size look up the table, ids at
    or above it look up `extra[:, columns]` (id = table size + row)."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor, columns: slice = slice(None)):
        super().__init__()
        self.base = base
        self.extra = extra
        self.columns = columns
        self.base_size = base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:  # libraries that peek at .weight see the frozen table
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_size
        out = self.base(ids.clamp(max=self.base_size - 1))
        if not bool(is_new.any()):
            return out
        rows = self.extra[:, self.columns].to(device=out.device)[(ids - self.base_size).clamp(min=0)]
        return torch.where(is_new.unsqueeze(-1), rows.to(out.dtype), out)


@contextlib.contextmanager
def extended_vocabulary(text_encoder, extra: torch.Tensor, columns: slice = slice(None)):
    """Within the block, ids from the vocabulary size on refer to the rows of `extra[:, columns]`."""
    base = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(ExtendedTokenEmbedding(base, extra, columns))
    try:
        yield base.num_embeddings
    finally:
        text_encoder.set_input_embeddings(base)


@contextlib.contextmanager
def extended_vocabularies(text_encoders: list, extra: torch.Tensor):
    """extended_vocabulary for each text encoder, each reading its own columns of `extra`
    [n, sum of the encoders' widths] (SDXL: the first encoder's columns first)."""
    widths = [te.get_input_embeddings().embedding_dim for te in text_encoders]
    if extra.shape[-1] != sum(widths):
        raise ValueError(f"vectors of width {extra.shape[-1]} do not fit text encoders of widths {widths}")
    starts = [sum(widths[:i]) for i in range(len(widths))]
    with extended_vocabularies_from(text_encoders, [(extra, slice(s, s + w)) for s, w in zip(starts, widths)]) as sizes:
        yield sizes


@contextlib.contextmanager
def extended_vocabularies_from(text_encoders: list, sources: list[tuple[torch.Tensor, slice]]):
    """extended_vocabulary for each text encoder, encoder i reading `tensor[:, columns]` of its
    (tensor, columns) in `sources`: the parts of a token may live in different tensors (some
    trained, some kept at their start)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(extended_vocabulary(te, tensor, columns)) for te, (tensor, columns) in zip(text_encoders, sources)]


@contextlib.contextmanager
def plain_vocabularies(text_encoders: list):
    """Within the block, text encoders a running training has extended (extended_vocabulary) use
    their own token table again, so that diffusers can load an embedding file into them (it
    resizes the table); the extension is put back afterwards."""
    extended = [(te, te.get_input_embeddings()) for te in text_encoders if isinstance(te.get_input_embeddings(), ExtendedTokenEmbedding)]
    for text_encoder, extension in extended:
        text_encoder.set_input_embeddings(extension.base)
    try:
        yield
    finally:
        for text_encoder, extension in extended:
            text_encoder.set_input_embeddings(extension)


def encode_with_placeholder(tokenizer, prompt: str, placeholder: str, placeholder_ids: list[int], max_length: int = 77) -> list[int]:
    """Token ids of `prompt` with every `placeholder` replaced by `placeholder_ids`, framed by the
    start marker (T5 has none) and end marker, and cut to `max_length` (keeping the end marker)."""
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    pieces = prompt.split(placeholder)
    for i, piece in enumerate(pieces):
        if piece.strip():
            ids += tokenize_words(tokenizer, piece)
        if i < len(pieces) - 1:
            ids += placeholder_ids
    ids = ids[: max_length - 1] + [tokenizer.eos_token_id]
    return ids


def pad_batch(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Pad to the longest sequence of the batch (not to 77: see the QuickEmbedding notes)."""
    longest = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], dtype=torch.long)


def save_embedding(
    path: str | Path,
    token: str,
    vectors: torch.Tensor,
    metadata: dict[str, object] | None = None,
    widths: tuple[int, ...] | None = None,
    keys: tuple[str, ...] = (),
) -> Path:
    """Save a run's embedding through formats.write_embedding, atomically, with string metadata:
    {token: tensor[n, dim]} (diffusers' layout) for one text encoder; for a family with a key
    per text encoder (Family.embedding_keys: SDXL clip_l, clip_g; SD 3.x + t5; Flux.1 clip_l,
    t5), `vectors` holds the parts side by side, of `widths`, saved in one file as {key: part}
    (OneTrainer's layout), the token in the metadata."""
    if keys:  # the family these keys are all of: a run knows its family, which the keys alone may not tell
        metadata = {FAMILY_KEY: FAMILY_OF_KEYS[tuple(keys)].name, **(metadata or {})}
    embedding = EmbeddingFile.from_joined(token, vectors, widths, keys, metadata)
    return write_embedding(embedding, path, "diffusers", one_file=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (method, steps, base model...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_into_pipeline(pipe, token: str, vectors: torch.Tensor | dict[str, torch.Tensor], scale: float = 1.0) -> list[str]:
    """Add a learned token to a diffusers pipeline with diffusers' own `load_textual_inversion`
    (which names several vectors token, token_1, ...); `scale` multiplies the vectors.
    `vectors` is a tensor [n, dim] for a model with one text encoder, or the parts of an
    EmbeddingFile ({key: [n, width]}, the family's embedding_keys): each part goes into its own
    text encoder and tokenizer, one call each, as diffusers documents for SDXL; a text encoder
    without a part (formats.check_fits: SD 3.x, Flux.1) gets nothing. Returns the names added;
    `unload_from_pipeline(pipe, names)` removes them again."""
    from .families import family_of
    from .formats import ONE_ENCODER
    from .models import pipeline_text_widths, text_encoders, tokenizers

    family = family_of(pipe)
    parts = check_fits(EmbeddingFile(token, vectors), pipeline_text_widths(pipe), f"the embedding of {token!r}", family)
    names = token_names(token, next(iter(parts.values())).shape[0])
    for key, tokenizer, text_encoder in zip(family.embedding_keys or (ONE_ENCODER,), tokenizers(pipe), text_encoders(pipe)):
        if key not in parts:
            continue
        try:
            _keep_rows_past_the_tokenizer(text_encoder, tokenizer)
            _loader(pipe).load_textual_inversion(
                (parts[key].float() * scale).to(text_encoder.dtype), token=token, tokenizer=tokenizer, text_encoder=text_encoder
            )
        except BaseException:
            unload_from_pipeline(pipe, names)  # leave no half-loaded token behind
            raise
    return names


def unload_from_pipeline(pipe, names: list[str]) -> None:
    """Remove tokens added by `load_into_pipeline`, leaving the (cached) pipeline as it was:
    diffusers' unload rebuilds the token table as a trainable parameter and leaves the
    enlarged vocabulary size in the config, so both are put back."""
    from .models import text_encoders, tokenizers

    for tokenizer, text_encoder in zip(tokenizers(pipe), text_encoders(pipe)):
        if names[0] not in tokenizer.get_vocab():
            continue
        _loader(pipe).unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=text_encoder)
        _decode_as_before(tokenizer)
        _restore_rows_past_the_tokenizer(text_encoder, tokenizer)
        table = text_encoder.get_input_embeddings()
        table.requires_grad_(False)
        text_encoder.config.vocab_size = table.num_embeddings


def _decode_as_before(tokenizer) -> None:
    """diffusers' unload gives a fast tokenizer a new backend (built from its JSON), which loses
    what the tokenizer's class put on the old one: CLIP's turns the "</w>" ending a word back into
    a space when decoding (without it, decoded prompts read 'cat</w>')."""
    rewrap = getattr(tokenizer, "_wrap_decode_method_backend_tokenizer", None)
    if rewrap is not None:
        rewrap()


def _loader(pipe):
    """The pipeline itself when it has diffusers' load/unload_textual_inversion; else (SD 3.x's
    StableDiffusion3Pipeline does not mix TextualInversionLoaderMixin in, though its CLIP and T5
    tokenizers and encoders are the kind the loader handles) the mixin on its own, given what of
    the pipeline it reads: the components and device map (for offload hooks), and the offloads."""
    if hasattr(type(pipe), "load_textual_inversion"):
        return pipe
    from diffusers.loaders import TextualInversionLoaderMixin

    loader = TextualInversionLoaderMixin()
    loader.components, loader.hf_device_map = pipe.components, getattr(pipe, "hf_device_map", None)
    loader.enable_model_cpu_offload, loader.enable_sequential_cpu_offload = pipe.enable_model_cpu_offload, pipe.enable_sequential_cpu_offload
    return loader


def expands_names_itself(pipe) -> bool:
    """Whether the pipeline spells a multi-vector token out (token token_1 ...) in its prompts
    (diffusers' maybe_convert_prompt, which SD 3.x's pipeline does not call)."""
    return hasattr(type(pipe), "maybe_convert_prompt")


# T5's token table has rows past its tokenizer's last token (T5-XXL: 32128 rows for 32100 tokens),
# which diffusers' loader drops when it sizes the table to the tokenizer's length plus the new
# tokens; they are kept here and put back when the tokens are unloaded, so a cached pipeline ends
# as it was. No token reaches them; CLIP's tables have none.
_ROWS_PAST_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _keep_rows_past_the_tokenizer(text_encoder, tokenizer) -> None:
    table = text_encoder.get_input_embeddings().weight
    if table.shape[0] > len(tokenizer) and text_encoder not in _ROWS_PAST_TOKENIZER:
        _ROWS_PAST_TOKENIZER[text_encoder] = (len(tokenizer), table[len(tokenizer):].detach().clone())


def _restore_rows_past_the_tokenizer(text_encoder, tokenizer) -> None:
    size, rows = _ROWS_PAST_TOKENIZER.get(text_encoder, (None, None))
    if size is None or len(tokenizer) != size or text_encoder.get_input_embeddings().num_embeddings != size:
        return  # other tokens are still loaded: the rows come back when they go
    text_encoder.resize_token_embeddings(size + rows.shape[0], mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[size:] = rows.to(text_encoder.get_input_embeddings().weight)
    del _ROWS_PAST_TOKENIZER[text_encoder]


def _name_regex(name: str) -> str:
    """`name` as a whole word, as A1111 finds an embedding's name in a prompt (it matches the
    name's CLIP tokens): 'fresh' in 'fresh-looking', not in 'freshly'."""
    before = r"(?<!\w)" if re.match(r"\w", name[:1]) else ""
    after = r"(?!\w)" if re.match(r"\w", name[-1:]) else ""
    return before + re.escape(name) + after


def _name_pattern(name: str) -> re.Pattern:
    return re.compile(_name_regex(name), re.IGNORECASE)  # in any case: CLIP lowercases


def mentions(text: str | None, name: str) -> bool:
    """Whether a prompt uses the embedding called `name`."""
    return bool(text and name and _name_pattern(name).search(text))


def replace_name(text: str | None, name: str, replacement: str) -> str | None:
    """`text` with every use of the embedding called `name` replaced by `replacement`."""
    return _name_pattern(name).sub(lambda _: replacement, text) if text else text


@contextlib.contextmanager
def embeddings_in_pipeline(pipe, embeddings: list, scale: float = 1.0):
    """Within the block, `pipe` knows `embeddings` (formats.EmbeddingFile); yields a function
    `rewrite(text, encoder=None)` that rewrites a prompt to use them. Each is loaded under a
    made-up token of its own and the prompt's uses of its name become that token, so a name that
    is an ordinary word ('fresh', as A1111 users name files) works as in A1111. For the prompt of
    text encoder number `encoder`, the name of an embedding without a part for that encoder (an
    SD 3.x file without T5) is left out, as OneTrainer and ComfyUI leave it out. Unloaded again at
    the end."""
    from .families import family_of
    from .formats import ONE_ENCODER
    from .models import pipeline_text_widths

    family = family_of(pipe)
    added: list[str] = []
    internal: dict[str, str] = {}
    absent: dict[str, set[int]] = {}  # the encoders each name is left out for
    try:
        for i, embedding in enumerate(embeddings):
            where = embedding.path.name if embedding.path is not None else repr(embedding.token)
            parts = check_fits(embedding, pipeline_text_widths(pipe), where, family)
            token = f"<tinv-embedding-{i}>"
            loaded = load_into_pipeline(pipe, token, parts, scale)
            added += loaded
            internal[embedding.token] = token if expands_names_itself(pipe) else " ".join(loaded)
            absent[embedding.token] = {e for e, key in enumerate(family.embedding_keys or (ONE_ENCODER,)) if key not in parts}

        # One pass over the prompt, longest name first ('my-cat-2' before 'my-cat'), so that no
        # name is found inside another's replacement.
        names = sorted(internal, key=len, reverse=True)
        pattern = re.compile("|".join(f"(?P<n{i}>{_name_regex(name)})" for i, name in enumerate(names)), re.IGNORECASE)

        def rewrite(text, encoder: int | None = None):
            def replacement(match):
                name = names[int(match.lastgroup[1:])]
                return "" if encoder in absent[name] else internal[name]

            return pattern.sub(replacement, text) if text and names else text

        yield rewrite
    finally:
        if added:  # a cached pipeline stays clean for other jobs
            unload_from_pipeline(pipe, added)
