"""New tokens: naming, validating, initializing, splicing into a text encoder, saving.

Only the new vectors are trainable: the text encoder keeps its frozen token table, and a thin
module looks up ids past its end in a small [n, dim] parameter. No gradient or optimizer state
ever touches the 49408-row vocabulary, and there is nothing to restore after a step.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def initial_vectors(embedding_table: torch.Tensor, tokenizer, init: str | None, count: int, seed: int = 0) -> torch.Tensor:
    """Starting vectors [count, dim] in float32.

    From a word or phrase: one vector takes the mean of its tokens' embeddings; several vectors
    take its tokens in turn (so a caption of n tokens gives each vector its own word). With no
    initializer, random vectors with the table's own spread.
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
    return vectors[torch.arange(count) % len(ids)].clone()


class ExtendedTokenEmbedding(torch.nn.Module):
    """A frozen token table plus new rows: ids below the table's size look up the table, ids at
    or above it look up `extra` (id = table size + row)."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base = base
        self.extra = extra
        self.base_size = base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:  # libraries that peek at .weight see the frozen table
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_size
        out = self.base(ids.clamp(max=self.base_size - 1))
        if not bool(is_new.any()):
            return out
        rows = self.extra.to(device=out.device)[(ids - self.base_size).clamp(min=0)]
        return torch.where(is_new.unsqueeze(-1), rows.to(out.dtype), out)


@contextlib.contextmanager
def extended_vocabulary(text_encoder, extra: torch.Tensor):
    """Within the block, ids from the vocabulary size on refer to the rows of `extra`."""
    base = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(ExtendedTokenEmbedding(base, extra))
    try:
        yield base.num_embeddings
    finally:
        text_encoder.set_input_embeddings(base)


def encode_with_placeholder(tokenizer, prompt: str, placeholder: str, placeholder_ids: list[int], max_length: int = 77) -> list[int]:
    """Token ids of `prompt` with every `placeholder` replaced by `placeholder_ids`, framed by the
    start and end markers and cut to `max_length` (keeping the end marker)."""
    ids = [tokenizer.bos_token_id]
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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file so that a crash never leaves a half-written file in its place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor, metadata: dict[str, object] | None = None) -> Path:
    """Save in diffusers' layout {token: tensor[n, dim]}, with string metadata, atomically."""
    meta = {"format": "diffusers", "token": token, "vectors": str(vectors.shape[0]), "dim": str(vectors.shape[1])}
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    return atomic_save_safetensors({token: vectors}, path, meta)


def load_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    """Read a diffusers-layout safetensors embedding: (token, tensor[n, dim])."""
    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"{Path(path).name} holds {len(tensors)} tensors; a diffusers embedding file holds one")
    token, vectors = next(iter(tensors.items()))
    return token, vectors.reshape(-1, vectors.shape[-1])


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (method, steps, base model...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_into_pipeline(pipe, token: str, vectors: torch.Tensor, scale: float = 1.0) -> list[str]:
    """Add a learned token to a diffusers pipeline with diffusers' own `load_textual_inversion`
    (which names several vectors token, token_1, ...); `scale` multiplies the vectors. Returns
    the names added; `pipe.unload_textual_inversion()` removes them again."""
    names = token_names(token, vectors.shape[0])
    dtype = pipe.text_encoder.dtype
    pipe.load_textual_inversion(
        {token: (vectors.float() * scale).to(dtype)}, token=token, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
    )
    return names
