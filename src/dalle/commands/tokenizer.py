"""``dalle tokenizer``: train the caption BPE on a dataset's captions (paper, Stage 2) and inspect how it encodes.

    dalle tokenizer train --data-source shapes --out runs/text-tokenizer --vocab-size 16384 --text-len 256
    dalle tokenizer train --captions captions.txt --out runs/text-tokenizer
    dalle tokenizer encode --tokenizer runs/text-tokenizer "a red circle above a blue square"
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from dalle.cli import add_group
from dalle.config import add_options, from_args
from dalle.data.config import DataConfig
from dalle.data.images import BadRecord
from dalle.data.pipeline import check_caption, clean_caption
from dalle.data.records import SkipStats
from dalle.data.registry import open_source
from dalle.errors import UserError
from dalle.tokenizers.text import CONFIG_FILE, TOKENIZER_FILE, EncodeStats, TextTokenizer, TextTokenizerConfig

log = logging.getLogger(__name__)

PROGRESS_EVERY = 100_000  # captions between progress lines while reading a large corpus
STATS_BATCH = 1024


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "tokenizer", "train and inspect the caption BPE tokenizer (lower-cased, fixed length, "
                                        "per-position padding mask)")
    train = group.add_parser("train", help="train the BPE on a dataset's captions and save it",
                             description="Train the byte-level BPE on captions (from --data-source or a --captions "
                                         "file), save tokenizer.json + tokenizer_config.json to --out, and report "
                                         "the vocabulary size, tokens per caption and how many captions are cut.")
    train.add_argument("--out", type=Path, required=True, help="directory to write the tokenizer to")
    train.add_argument("--captions", help="plain-text file with one caption per line ('-' reads standard input), "
                                          "used instead of --data-source; the caption filters still apply")
    train.add_argument("--stats-captions", type=int, default=10_000,
                       help="how many captions (the first read) to measure tokens per caption and truncation on "
                            "(default: 10000)")
    train.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    add_options(train, TextTokenizerConfig, title="text tokenizer")
    add_options(train, DataConfig, prefix="data_", title="dataset (captions only; images are not decoded)")
    train.set_defaults(func=_train)

    encode = group.add_parser("encode", help="show how captions are tokenized",
                              description="Print the ids, tokens and padding mask of each caption.")
    encode.add_argument("captions", nargs="+", help="captions to encode")
    encode.add_argument("--tokenizer", type=Path, required=True,
                        help="directory written by `dalle tokenizer train` (or its tokenizer.json)")
    encode.add_argument("--dropout", action="store_true", help="apply BPE dropout, as when encoding training batches")
    encode.set_defaults(func=_encode)


# --- reading captions --------------------------------------------------------------------------------------------


def _checked(items: Iterable[tuple[str, str | bytes | None]], cfg: DataConfig, stats: SkipStats) -> Iterator[str]:
    """(key, raw caption) → cleaned captions passing the dataset's caption filters; every skip is counted."""
    for key, raw in items:
        stats.seen += 1
        try:
            text = clean_caption(raw)
            check_caption(text, cfg)
        except BadRecord as e:
            stats.skip(e.reason, key)
            continue
        stats.kept += 1
        if stats.kept % PROGRESS_EVERY == 0:
            log.info("read %d captions", stats.kept)
        yield text


def _file_lines(path: str) -> Iterator[tuple[str, str | bytes]]:
    """Lines of a caption file as (``line N``, raw line); UTF-8 by default, UTF-16 if the file has its BOM."""
    if path == "-":
        yield from _lines(sys.stdin.buffer)
        return
    try:
        with open(path, "rb") as f:
            yield from _lines(f)
    except FileNotFoundError:
        raise UserError(f"caption file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"caption file {path} is a directory; use --data-source for a dataset folder") from None


def _lines(f: io.BufferedReader) -> Iterator[tuple[str, str | bytes]]:
    lines: Iterable[str | bytes] = f
    if f.peek(2)[:2] in (b"\xff\xfe", b"\xfe\xff"):  # splitting UTF-16 bytes at b"\n" would break characters
        lines = io.TextIOWrapper(f, encoding="utf-16", errors="replace")
    for n, line in enumerate(lines, 1):
        yield f"line {n}", line  # bytes lines are decoded (and bad UTF-8 counted) by clean_caption


def _source_records(cfg: DataConfig) -> Iterator[tuple[str, str | bytes | None]]:
    records = open_source(cfg).records()
    if cfg.size is not None:
        records = itertools.islice(records, cfg.size)
    for record in records:
        yield record.key, record.caption  # record.load (the image) is never called


class _Sampled:
    """Passes captions through, keeping the first ``n`` to measure the trained tokenizer on afterwards."""

    def __init__(self, captions: Iterable[str], n: int):
        self.captions, self.n, self.kept = captions, n, []

    def __iter__(self) -> Iterator[str]:
        for text in self.captions:
            if len(self.kept) < self.n:
                self.kept.append(text)
            yield text


def measure(tokenizer: TextTokenizer, captions: list[str]) -> EncodeStats:
    """Tokens per caption and truncation at ``text_len`` over ``captions`` (deterministic encoding)."""
    before = tokenizer.reset_stats()
    for start in range(0, len(captions), STATS_BATCH):
        tokenizer.encode_batch(captions[start:start + STATS_BATCH])
    stats, tokenizer.stats = tokenizer.stats, before
    return stats


# --- commands ----------------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    config = from_args(TextTokenizerConfig, args)
    data = from_args(DataConfig, args, prefix="data_")
    if args.stats_captions < 1:
        raise UserError("--stats-captions must be at least 1")
    if args.captions is not None and hasattr(args, "data_source"):
        raise UserError("give either --captions or --data-source, not both")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if (out / TOKENIZER_FILE).exists() and not args.overwrite:
        raise UserError(f"{out / TOKENIZER_FILE} already exists (pass --overwrite to replace it)")

    skips = SkipStats()
    raw = _file_lines(args.captions) if args.captions is not None else _source_records(data)
    corpus = args.captions if args.captions is not None else f"{data.source} ({data.split})"
    sampled = _Sampled(_checked(raw, data, skips), args.stats_captions)
    log.info("training a %d-token BPE on the captions of %s", config.vocab_size, corpus)
    try:
        tokenizer = TextTokenizer.train(sampled, config)
    except UserError:
        if skips.seen:
            print(skips.summary(), file=sys.stderr)
        raise
    tokenizer.save(out)
    lengths = measure(tokenizer, sampled.kept)
    report = {"corpus": corpus, "captions": skips.to_dict(), "vocab_size": tokenizer.vocab_size,
              "requested_vocab_size": config.vocab_size, "text_len": config.text_len,
              "measured_on": lengths.captions, "mean_tokens": lengths.mean_tokens, "max_tokens": lengths.max_tokens,
              "truncated_fraction": lengths.truncated_fraction}
    (out / "train_stats.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_train_report(tokenizer, config, skips, lengths, out)
    return 0


def _print_train_report(tokenizer: TextTokenizer, config: TextTokenizerConfig, skips: SkipStats,
                        lengths: EncodeStats, out: Path) -> None:
    print(skips.summary())
    note = "" if tokenizer.vocab_size == config.vocab_size else (
        f" (requested {config.vocab_size}; this corpus supports no more merges at min_frequency "
        f"{config.min_frequency})")
    print(f"vocabulary size: {tokenizer.vocab_size}{note}")
    print(f"tokens per caption: mean {lengths.mean_tokens:.1f}, max {lengths.max_tokens} "
          f"(first {lengths.captions} captions)")
    print(f"truncated at text_len={config.text_len}: {lengths.truncated_fraction:.2%} "
          f"({lengths.truncated} of {lengths.captions})")
    print(f"saved {out / TOKENIZER_FILE} and {out / CONFIG_FILE}")


def _encode(args: argparse.Namespace) -> int:
    tokenizer = TextTokenizer.load(args.tokenizer)
    print(f"vocab_size {tokenizer.vocab_size}, text_len {tokenizer.text_len}"
          + (f", BPE dropout {tokenizer.config.dropout}" if args.dropout else ""))
    for caption in args.captions:
        tokenizer.reset_stats()
        ids, pad_mask = tokenizer.encode(caption, dropout=args.dropout)  # (text_len,) each
        n_all = tokenizer.stats.max_tokens  # before truncation
        kept = ids[~pad_mask].tolist()
        padded = int(pad_mask.sum())
        print(f"\n{tokenizer.normalize(caption)!r}")
        print(f"  ids:    {kept}")
        print(f"  tokens: {tokenizer.pieces(kept)}")
        span = f"positions {len(kept)}..{tokenizer.text_len - 1} padded (mask True)" if padded else "no padding"
        print(f"  {len(kept)} tokens, {padded} padding: {span}")
        if n_all > len(kept):
            print(f"  truncated: {n_all - len(kept)} tokens past text_len={tokenizer.text_len} dropped")
    return 0
