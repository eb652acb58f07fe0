"""The caption tokenizer: lower-cased, byte-level BPE with a fixed length and a padding mask (paper, Stage 2).

The paper encodes "the lower-cased caption using BPE with a vocabulary size of 16,384" into at most 256 tokens, uses
BPE dropout 0.1 while training the prior, and pads short captions with "a special padding token separately for each
of the 256 text positions". We therefore train a byte-level BPE (Hugging Face ``tokenizers``): every string, emoji,
CJK or control character included, maps to byte tokens, so nothing is ever unknown and decoding returns the
normalised text exactly (NFKC, then lower case). Padding is *not* a token of this vocabulary; the contract is::

    ids, pad_mask = tokenizer.encode_batch(texts)   # ids (B, text_len) int64, pad_mask (B, text_len) bool
    texts = tokenizer.decode(ids, pad_mask)

``pad_mask`` is True at padded positions, whose ids are :data:`PAD_ID` (0); the prior ignores those ids and puts its
own learned per-position padding embedding there. Id 0 is the ``<|endoftext|>`` special token in tokenizers trained
here, which encoding never emits (the literal string in a caption is encoded as ordinary text), so a 0 is never a
real caption token. Captions longer than ``text_len`` are cut to ``text_len`` tokens and counted in
:attr:`TextTokenizer.stats`, never an error. ``encode(..., dropout=True)`` applies BPE dropout (training only);
the saved ``tokenizer.json`` always has dropout off, so loading it for inference is deterministic. With ``seeds``
(one per caption), dropout draws from a stream of its own per caption, so that a training run is reproducible and
resumes exactly; the ``tokenizers`` library's own BPE dropout cannot be seeded, so dropout runs here, in Python
(:class:`_DropoutBPE`), on the library's normalised and pre-tokenised pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle.config import check, from_dict, option, to_dict
from dalle.errors import UserError

END_OF_TEXT = "<|endoftext|>"  # the only special token; id 0, never produced by encoding
PAD_ID = 0  # id written at padded positions; the mask, not the id, says what is padding
BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())  # 256 byte tokens: the smallest possible vocabulary
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
FORMAT = "dalle-text-tokenizer"


@dataclasses.dataclass
class TextTokenizerConfig:
    vocab_size: int = option(16_384, "BPE vocabulary size to train, the 256 byte tokens and <|endoftext|> included "
                             "(paper: 16,384); a small corpus may yield fewer, and the real size is recorded")
    text_len: int = option(256, "text tokens per caption: longer captions are truncated, shorter ones padded "
                           "(paper: 256)")
    dropout: float = option(0.1, "BPE dropout, the probability of skipping each merge when encoding training "
                            "captions (paper: 0.1); never applied at inference")
    min_frequency: int = option(2, "a pair of tokens must occur this many times in the corpus to become a merge")
    lowercase: bool = option(True, "lower-case captions before BPE (the paper does)")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "text_len", "min_frequency"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool), self, name, "must be an integer")
        check(self.vocab_size > BYTE_ALPHABET, self, "vocab_size",
              f"must be at least {BYTE_ALPHABET + 1} ({BYTE_ALPHABET} byte tokens + {END_OF_TEXT})")
        check(self.text_len >= 1, self, "text_len", "must be at least 1")
        check(isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0, self, "dropout",
              "must be in [0, 1)")
        check(self.min_frequency >= 1, self, "min_frequency", "must be at least 1")
        check(isinstance(self.lowercase, bool), self, "lowercase", "must be true or false")


@dataclasses.dataclass
class EncodeStats:
    """What encoding has seen since the last reset: how long captions are and how many were cut to ``text_len``."""

    captions: int = 0
    tokens: int = 0  # before truncation
    truncated: int = 0
    max_tokens: int = 0

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.captions if self.captions else 0.0

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.captions if self.captions else 0.0

    def add(self, n_tokens: int, text_len: int) -> None:
        self.captions += 1
        self.tokens += n_tokens
        self.truncated += n_tokens > text_len
        self.max_tokens = max(self.max_tokens, n_tokens)


def _new_tokenizer(lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: byte-level, every input is covered by the 256 byte tokens
    # NFKC first so that compatibility forms (full-width letters, ligatures) are lower-cased as the letters they are.
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    # No prefix space: decoding then gives back the normalised caption exactly, first word included.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class _DropoutBPE:
    """BPE dropout as the paper uses it (Provilkov et al., 2020): at every merge step each applicable merge is skipped
    with probability ``p``, the best-ranked one left is applied, and a word is done when none is left. With ``p = 0``
    it gives the library's encoding (a test holds it to that); the random stream is the caller's.

    Follows byte-level BPE tokenizers (what :meth:`TextTokenizer.train` writes): the library normalises and
    pre-tokenises, each piece's characters are its initial symbols. :meth:`build` returns None for a tokenizer.json
    with word prefixes or suffixes, byte fallback or an unknown token, where dropout stays the library's (unseeded).
    """

    def __init__(self, tokenizer: Tokenizer, vocab: dict[str, int], merges: list[Any], ignore_merges: bool):
        self.normalizer, self.pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
        self.vocab, self.ignore_merges = vocab, ignore_merges
        self.ranks = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m): r for r, m in enumerate(merges)}

    @classmethod
    def build(cls, tokenizer: Tokenizer) -> _DropoutBPE | None:
        model = json.loads(tokenizer.to_str())["model"]
        if (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback")
                or model.get("unk_token") is not None or tokenizer.pre_tokenizer is None):
            return None
        return cls(tokenizer, model["vocab"], model["merges"], bool(model.get("ignore_merges")))

    def ids(self, text: str, rng: random.Random, p: float) -> list[int]:
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        out: list[int] = []
        for piece, _ in self.pre_tokenizer.pre_tokenize_str(text):
            if self.ignore_merges and piece in self.vocab:
                out.append(self.vocab[piece])
            else:
                out.extend(self.vocab[symbol] for symbol in self.merge(list(piece), rng, p))
        return out

    def merge(self, symbols: list[str], rng: random.Random, p: float) -> list[str]:
        while len(symbols) > 1:
            best: tuple[int, int] | None = None  # (rank, position) of the best merge that survived dropout
            for i in range(len(symbols) - 1):
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and rng.random() >= p and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols


class _Counted:
    """Wraps the caption stream for the BPE trainer: checks types and counts the non-empty captions it passes on."""

    def __init__(self, captions: Iterable[str]):
        self.captions = captions
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.captions:
            if not isinstance(text, str):
                raise TypeError(f"captions must be str, got {type(text).__name__}")
            if text.strip():
                self.count += 1
                yield text


def _read_config(path: Path) -> tuple[TextTokenizerConfig, int | None]:
    """``tokenizer_config.json`` → (config, recorded vocabulary size); UserError if it is malformed."""
    try:
        meta = json.loads(path.read_text())
        fields, recorded = meta["config"], meta.get("vocab_size")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(fields, dict):
        raise UserError(f"cannot read {path}: 'config' must be an object")
    return from_dict(TextTokenizerConfig, fields), recorded  # a bad field raises ConfigError naming it


class TextTokenizer:
    """A trained BPE caption tokenizer with the fixed-length, padding-mask interface described in the module doc."""

    def __init__(self, tokenizer: Tokenizer, config: TextTokenizerConfig):
        if not isinstance(tokenizer.model, models.BPE):
            raise UserError(f"the text tokenizer must be a BPE model, got {type(tokenizer.model).__name__}")
        self.config = config
        self._tok = self._prepared(tokenizer, dropout=None)
        self._dropout_tok: Tokenizer | None = None  # built on first use of encode(..., dropout=True)
        self._unseeded = random.Random()  # dropout's stream where no seeds are given
        self.stats = EncodeStats()

    @staticmethod
    def _prepared(tokenizer: Tokenizer, dropout: float | None) -> Tokenizer:
        tokenizer.no_truncation()  # we truncate ourselves, to count it
        tokenizer.no_padding()  # padding is the prior's business (per-position learned tokens)
        tokenizer.encode_special_tokens = True  # "<|endoftext|>" typed in a caption is text, not the special id
        tokenizer.model.dropout = dropout
        return tokenizer

    # --- training and files -------------------------------------------------------------------------------------

    @classmethod
    def train(cls, captions: Iterable[str], config: TextTokenizerConfig | None = None) -> TextTokenizer:
        """Train on a stream of captions (read once, never held in memory). Raises UserError if it is empty."""
        config = config or TextTokenizerConfig()
        tok = _new_tokenizer(config.lowercase)
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        counted = _Counted(captions)
        tok.train_from_iterator(iter(counted), trainer)
        if counted.count == 0:
            raise UserError("no captions to train the text tokenizer on (the corpus is empty)")
        return cls(tok, config)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` (standard Hugging Face format, dropout off) and ``tokenizer_config.json``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / TOKENIZER_FILE))
        meta = {"format": FORMAT, "version": 1, "vocab_size": self.vocab_size, "config": to_dict(self.config)}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load from a directory written by :meth:`save`, or a ``tokenizer.json`` (its config beside it, if any)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no text tokenizer at {path} (expected a directory with {TOKENIZER_FILE} or the file)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for any malformed file
            raise UserError(f"cannot read text tokenizer {file}: {str(e)[:200]}") from None
        config_file = file.parent / CONFIG_FILE
        config, recorded = _read_config(config_file) if config_file.is_file() else (TextTokenizerConfig(), None)
        if recorded is not None and recorded != tok.get_vocab_size():
            raise UserError(f"{file} has {tok.get_vocab_size()} tokens but {config_file} says {recorded}: "
                            "the two files come from different tokenizers")
        return cls(tok, config)

    def __getstate__(self) -> dict[str, Any]:
        # For DataLoader workers. Hugging Face's own pickling drops encode_special_tokens, so go through JSON.
        return {"json": self._tok.to_str(), "config": to_dict(self.config), "stats": self.stats}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), from_dict(TextTokenizerConfig, state["config"]))
        self.stats = state["stats"]

    # --- encoding ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size (may be below ``config.vocab_size`` for a small corpus)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def text_len(self) -> int:
        return self.config.text_len

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it (NFKC, lower case): what ``decode(encode(text))`` gives back."""
        normalizer = self._tok.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text

    def _backend(self, dropout: bool) -> Tokenizer:
        if not dropout or self.config.dropout == 0.0:
            return self._tok
        if self._dropout_tok is None:
            # A separate copy so that the deterministic tokenizer (and its merge cache) is never touched.
            self._dropout_tok = self._prepared(Tokenizer.from_str(self._tok.to_str()), self.config.dropout)
        return self._dropout_tok

    def token_ids(self, text: str, dropout: bool = False, seed: int | str | None = None) -> list[int]:
        """All token ids of ``text``, not truncated and not padded; ``seed`` fixes the draws of BPE dropout."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self._ids([text], dropout, None if seed is None else [seed])[0]

    def _ids(self, texts: list[str], dropout: bool, seeds: Sequence[int | str] | None) -> list[list[int]]:
        if seeds is not None and len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} captions")
        bpe = self._dropout_path if dropout and self.config.dropout > 0.0 else None
        if bpe is None:
            return [enc.ids for enc in self._backend(dropout).encode_batch(texts)]
        rngs = [random.Random(seed) for seed in seeds] if seeds is not None else [self._unseeded] * len(texts)
        return [bpe.ids(text, rng, self.config.dropout) for text, rng in zip(texts, rngs, strict=True)]

    @functools.cached_property
    def _dropout_path(self) -> _DropoutBPE | None:
        """Our seeded dropout, or None for a tokenizer.json it cannot follow exactly (the library's dropout then)."""
        return _DropoutBPE.build(self._tok)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The text of each token (a token holding part of a multi-byte character shows as U+FFFD)."""
        return [self._tok.decode([i], skip_special_tokens=False) for i in ids]

    def encode(self, text: str, dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption → ``ids (text_len,)`` int64 and ``pad_mask (text_len,)`` bool (True where padded)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids, pad_mask = self.encode_batch([text], dropout=dropout)
        return ids[0], pad_mask[0]

    def encode_batch(self, texts: Sequence[str], dropout: bool = False,
                     seeds: Sequence[int | str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → ``ids (B, text_len)`` int64 and ``pad_mask (B, text_len)`` bool; padded ids are :data:`PAD_ID`.

        ``dropout=True`` applies BPE dropout with ``config.dropout`` (use it for training batches only); ``seeds``,
        one per caption, make its draws reproducible (each caption its own stream, whatever the batch around it).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str")
        length = self.text_len
        rows, lengths = [], []
        for ids in self._ids(list(texts), dropout, seeds):
            self.stats.add(len(ids), length)
            row = ids[:length]
            lengths.append(len(row))
            rows.append(row + [PAD_ID] * (length - len(row)))
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)  # (B, text_len)
        positions = torch.arange(length)  # (text_len,)
        pad_mask = positions[None, :] >= torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)  # (B, text_len)
        return ids, pad_mask

    def reset_stats(self) -> EncodeStats:
        """Return the encoding statistics so far and start counting afresh."""
        stats, self.stats = self.stats, EncodeStats()
        return stats

    # --- decoding ---------------------------------------------------------------------------------------------

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
               pad_mask: torch.Tensor | None = None) -> str | list[str]:
        """Inverse of :meth:`encode` / :meth:`encode_batch`: ``(text_len,)`` → str, ``(B, text_len)`` → list of str.

        Positions where ``pad_mask`` is True are dropped; special tokens (``<|endoftext|>``) are skipped too, so
        ids sampled by a prior decode without a mask. Bytes cut in half by truncation show as U+FFFD.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim not in (1, 2):
            raise ValueError(f"ids must have shape (text_len,) or (B, text_len), got {tuple(ids.shape)}")
        if pad_mask is None:
            pad_mask = torch.zeros_like(ids, dtype=torch.bool)
        pad_mask = torch.as_tensor(pad_mask, dtype=torch.bool)
        if pad_mask.shape != ids.shape:
            raise ValueError(f"pad_mask shape {tuple(pad_mask.shape)} differs from ids shape {tuple(ids.shape)}")
        kept = ids[~pad_mask]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {int(kept.min())}..{int(kept.max())}")
        rows = [row[~m].tolist() for row, m in zip(ids.reshape(-1, ids.shape[-1]), pad_mask.reshape(-1, ids.shape[-1]),
                                                     strict=True)]
        texts = self._tok.decode_batch(rows, skip_special_tokens=True)
        return texts[0] if ids.ndim == 1 else texts
