"""Rebuild assets/clip_tokenizer/{vocab.json,merges.txt} from CLIP's BPE merge list.

CLIP's BPE file (bpe_simple_vocab_16e6.txt.gz, MIT licence, shipped inside the open_clip_torch
and openai-clip wheels) is the single source of both files: the vocabulary is the 256 byte
symbols, the same with the end-of-word marker, one entry per merge, then the two special tokens.
Usage: python scripts/make_tokenizer_assets.py PATH/TO/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps 49152 - 256 - 2 merges, so that bytes + merges + 2 specials make 49408 ids.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def main(bpe_path: str) -> None:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
