"""CLIP's byte-level BPE tokenizer, for a user's CLIP checkpoint (:mod:`dalle.models.clip`).

CLIP reads lower-cased text split by a regular expression into words (letters, single digits, other symbols, English
contractions), each word's UTF-8 bytes mapped to printable characters and merged by the 48,894 merges of
``bpe_simple_vocab_16e6.txt.gz``, the last character of a word marked with ``</w>``; ``<|startoftext|>`` and
``<|endoftext|>`` frame the ids, which are zero-padded to the context length (77) or cut with end-of-text kept last.
The merges run in the ``tokenizers`` library (the same engine as our own BPE); the cleaning before it (HTML entities,
whitespace, ``ftfy`` when it is installed) is open_clip's. A test checks equal ids with open_clip's tokenizer.

The vocabulary file is not part of CLIP checkpoints and cannot be downloaded here; :func:`find_vocab` looks for it.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from dalle.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
START, END = "<|startoftext|>", "<|endoftext|>"
WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Every byte → a printable character (printable Latin-1 bytes map to themselves, the rest to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def find_vocab(explicit: str | Path | None = None, beside: Path | None = None) -> Path:
    """The BPE vocabulary: ``explicit``, else beside the checkpoint, else in an installed open_clip / clip package."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"CLIP vocabulary {path} does not exist")
        return path
    candidates = []
    if beside is not None:
        candidates.append((beside if beside.is_dir() else beside.parent) / VOCAB_FILE)
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)  # locates the package without importing it
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) / VOCAB_FILE for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"CLIP's BPE vocabulary ({VOCAB_FILE}) was not found beside the checkpoint nor in an installed "
                    "open_clip or clip package: give its path with --clip-vocab (it ships in the open_clip_torch "
                    "wheel: pip install --no-deps open_clip_torch)")


def _clean(text: str) -> str:
    try:
        import ftfy  # optional: mends mis-decoded text as open_clip does
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    def __init__(self, vocab_file: str | Path, context_length: int = 77):
        try:
            with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read CLIP vocabulary {vocab_file}: {e}") from None
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1] if line.strip()]
        if len(merges) < 1 or any(len(m) != 2 for m in merges):
            raise UserError(f"{vocab_file} is not a CLIP BPE vocabulary (a gzip text file of merges)")
        chars = list(byte_alphabet().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
        ids = {token: i for i, token in enumerate(vocab)}
        tok = Tokenizer(models.BPE(ids, merges, end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._tok, self.context_length, self.vocab_size = tok, context_length, len(vocab)
        self.start_id, self.end_id = ids[START], ids[END]

    def normalize(self, text: str) -> str:
        return _clean(text)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without the start / end tokens."""
        return self._tok.encode(_clean(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """``(B, context_length)`` ids: start, the text's ids, end, zeros; cut texts keep end-of-text last."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, enc in enumerate(self._tok.encode_batch([_clean(t) for t in texts], add_special_tokens=False)):
            ids = [self.start_id, *enc.ids, self.end_id][: self.context_length]
            ids[-1] = self.end_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out
