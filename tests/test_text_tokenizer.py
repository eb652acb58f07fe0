"""The caption BPE (paper, Stage 2): round trips, fixed length + padding mask, truncation, dropout, files, CLI."""

import json
import pickle
import random
import unicodedata

import pytest
import torch

import dalle.cli
from dalle.data.records import Record
from dalle.errors import ConfigError, UserError
from dalle.tokenizers.text import END_OF_TEXT, PAD_ID, TextTokenizer, TextTokenizerConfig

CORPUS = [
    "A red circle above a blue square",
    "two small green triangles to the left of a big yellow star",
    "a photo of a cat sitting on a wooden table next to a window",
    "An armchair in the shape of an avocado",
    "the exact same cat on the top as a sketch on the bottom",
    "a baby hedgehog in a christmas sweater walking a dog",
    "a storefront that has the word 'openai' written on it",
    "3 purple hexagons, 12 orange circles; 1 grey square!",
] * 20

VARIED = [
    "A Red Circle ABOVE a blue square",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines  and   runs of spaces",
    "punctuation: (brackets) [more], {braces}; 'quotes' \"double\" - dash... ?!",
    "numbers 0123456789 and 3.14159 and 1,000,000",
    "",
    "ＦＵＬＬ-ＷＩＤＴＨ letters and the ﬁ ligature",
    "Straße, café, naïve, ÆØÅ, Ελληνικά, русский текст",
]

UNSEEN = [
    "a dog 🐕 with a 🎩 and a family 👨‍👩‍👧",
    "中文标题 日本語のキャプション 한국어",
    "control \x07 bell \x1b escape \x7f del",
    "right-to-left עברית العربية",
    "combining e\u0301 and zero\u200bwidth",
    f"a caption that types {END_OF_TEXT} literally",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=600, text_len=128, dropout=0.3))


def _round_trip(tok: TextTokenizer, text: str) -> str:
    ids, pad_mask = tok.encode(text)
    return tok.decode(ids, pad_mask)


def test_normalisation_is_nfkc_then_lower_case(tok):
    assert tok.normalize("A Red CAT") == "a red cat"
    assert tok.normalize("ＡＢＣ ﬁ") == "abc fi"
    for text in VARIED:
        assert tok.normalize(text) == unicodedata.normalize("NFKC", text).lower()


@pytest.mark.parametrize("text", VARIED + CORPUS[:8])
def test_round_trip_gives_the_normalised_text(tok, text):
    assert _round_trip(tok, text) == tok.normalize(text)


@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_characters_round_trip(tok, text):
    assert len(tok.token_ids(text)) <= tok.text_len  # so the round trip is exact, not truncated
    assert _round_trip(tok, text) == tok.normalize(text)


def test_literal_end_of_text_is_ordinary_text(tok):
    ids, pad_mask = tok.encode(f"x {END_OF_TEXT} y")
    assert PAD_ID not in ids[~pad_mask].tolist()


def test_fixed_length_and_pad_mask(tok):
    texts = ["a red circle", "", "a photo of a cat sitting on a wooden table", UNSEEN[0]]
    ids, pad_mask = tok.encode_batch(texts)
    assert ids.shape == pad_mask.shape == (len(texts), tok.text_len)
    assert ids.dtype == torch.long and pad_mask.dtype == torch.bool
    for row, mask, text in zip(ids, pad_mask, texts, strict=True):
        n = len(tok.token_ids(text))
        assert mask.tolist() == [False] * n + [True] * (tok.text_len - n)  # padding is a suffix
        assert (row[mask] == PAD_ID).all()
        assert (row[~mask] != PAD_ID).all()  # id 0 is <|endoftext|>, never a caption token
        assert (row < tok.vocab_size).all()
    assert pad_mask[1].all()  # the empty caption is all padding
    single_ids, single_mask = tok.encode(texts[0])
    assert torch.equal(single_ids, ids[0]) and torch.equal(single_mask, pad_mask[0])


def test_truncation_is_counted_not_an_error(tok):
    long = " ".join(CORPUS[:8] * 3)
    assert len(tok.token_ids(long)) > tok.text_len
    tok.reset_stats()
    ids, pad_mask = tok.encode_batch([long, "a red circle"])
    stats = tok.reset_stats()
    assert stats.captions == 2 and stats.truncated == 1 and stats.truncated_fraction == 0.5
    assert stats.max_tokens == len(tok.token_ids(long))
    assert not pad_mask[0].any()
    assert tok.normalize(long).startswith(tok.decode(ids[0], pad_mask[0]))
    assert tok.stats.captions == 0  # reset


def test_dropout_changes_segmentation_only_when_enabled(tok):
    text = "two small green triangles to the left of a big yellow star"
    plain = tok.token_ids(text)
    assert all(tok.token_ids(text) == plain for _ in range(10))
    assert all(torch.equal(tok.encode(text)[0], tok.encode(text)[0]) for _ in range(5))
    dropped = [tok.token_ids(text, dropout=True) for _ in range(20)]
    assert any(ids != plain for ids in dropped)
    assert all(len(ids) >= len(plain) for ids in dropped)  # skipped merges only ever split tokens
    for ids in dropped:
        assert tok.decode(ids) == tok.normalize(text)  # same text, different segmentation
    assert tok.token_ids(text) == plain  # dropout never leaks into the deterministic path


def test_seeded_dropout_is_reproducible_per_caption(tok):
    texts = ["two small green triangles to the left of a big yellow star", CORPUS[1], VARIED[3]]
    seeds = ["0/7/12", "0/7/13", 5]
    ids, mask = tok.encode_batch(texts, dropout=True, seeds=seeds)
    again, _ = tok.encode_batch(texts, dropout=True, seeds=seeds)
    assert torch.equal(ids, again)
    # each caption has its own stream: the same caption and seed give the same tokens in any batch
    alone = tok.encode_batch(texts[1:2], dropout=True, seeds=seeds[1:2])[0]
    assert torch.equal(alone[0], ids[1])
    draws = {tuple(tok.token_ids(texts[0], dropout=True, seed=f"0/{step}/12")) for step in range(30)}
    assert len(draws) > 1  # other seeds, other segmentations
    assert all(tok.decode(list(d)) == tok.normalize(texts[0]) for d in draws)
    assert tok.decode(ids, mask) == [tok.normalize(t) for t in texts]
    with pytest.raises(ValueError, match="2 seeds for 3 captions"):
        tok.encode_batch(texts, dropout=True, seeds=seeds[:2])


def test_dropout_path_without_dropout_is_the_library_encoding(tok):
    # Dropout runs in our own merge loop; with p = 0 it must give exactly what the library's BPE gives.
    bpe = tok._dropout_path
    assert bpe is not None
    for text in [*sorted(set(CORPUS)), *VARIED, *UNSEEN, "aaaa bbbb aaaaaaa", "   "]:
        assert bpe.ids(text, random.Random(0), 0.0) == tok.token_ids(text), text


def test_zero_dropout_is_deterministic_even_in_training_mode():
    tok = TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=600, dropout=0.0))
    text = CORPUS[1]
    assert all(tok.token_ids(text, dropout=True) == tok.token_ids(text) for _ in range(10))


def test_small_corpus_gives_fewer_tokens_and_records_the_real_size(tok, tmp_path):
    assert 257 < tok.vocab_size < 600  # 256 bytes + <|endoftext|> + merges; this corpus cannot fill 600
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert meta["vocab_size"] == tok.vocab_size and meta["config"]["vocab_size"] == 600


def test_save_load_equality(tok, tmp_path):
    tok.save(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["model"]["dropout"] is None  # inference from the saved file is deterministic
    for loaded in (TextTokenizer.load(tmp_path), TextTokenizer.load(tmp_path / "tokenizer.json"),
                   pickle.loads(pickle.dumps(tok))):
        assert loaded.config == tok.config and loaded.vocab_size == tok.vocab_size
        for text in VARIED + UNSEEN:
            assert loaded.token_ids(text) == tok.token_ids(text)
        ids, mask = tok.encode_batch(VARIED)
        assert torch.equal(loaded.encode_batch(VARIED)[0], ids)
        assert loaded.decode(ids, mask) == tok.decode(ids, mask)


def test_training_streams_a_generator_once():
    reads = []

    def captions():
        for text in CORPUS:
            reads.append(text)
            yield text
    tok = TextTokenizer.train(captions(), TextTokenizerConfig(vocab_size=300))
    assert len(reads) == len(CORPUS) and tok.vocab_size == 300


def test_decode_shapes_and_bad_inputs(tok):
    ids, pad_mask = tok.encode_batch(["a red circle", "a blue square"])
    assert tok.decode(ids, pad_mask) == ["a red circle", "a blue square"]
    assert tok.decode(ids) == ["a red circle", "a blue square"]  # padded 0s are <|endoftext|>, skipped
    assert tok.decode(ids[0].tolist()) == "a red circle"
    with pytest.raises(ValueError, match="pad_mask shape"):
        tok.decode(ids, pad_mask[:, :3])
    with pytest.raises(ValueError, match="token ids"):
        tok.decode(torch.tensor([tok.vocab_size]))
    with pytest.raises(TypeError):
        tok.encode_batch("a red circle")
    with pytest.raises(TypeError):
        tok.encode(None)


@pytest.mark.parametrize("field, value", [("vocab_size", 256), ("vocab_size", 1000.5), ("text_len", 0),
                                          ("dropout", 1.0), ("dropout", -0.1), ("min_frequency", 0),
                                          ("lowercase", "yes")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"TextTokenizerConfig.{field}"):
        TextTokenizerConfig(**{field: value})


@pytest.mark.parametrize("corpus", [[], ["", "   ", "\n"]])
def test_empty_corpus_is_a_user_error(corpus):
    with pytest.raises(UserError, match="no captions"):
        TextTokenizer.train(corpus, TextTokenizerConfig(vocab_size=300))


def test_load_errors_are_user_errors(tok, tmp_path):
    with pytest.raises(UserError, match="no text tokenizer"):
        TextTokenizer.load(tmp_path / "missing")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(UserError, match="cannot read text tokenizer"):
        TextTokenizer.load(bad)
    good = tmp_path / "good"
    tok.save(good)
    (good / "tokenizer_config.json").write_text("not json")
    with pytest.raises(UserError, match="cannot read"):
        TextTokenizer.load(good)
    tok.save(good)
    meta = json.loads((good / "tokenizer_config.json").read_text())
    (good / "tokenizer_config.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 1}))
    with pytest.raises(UserError, match="different tokenizers"):
        TextTokenizer.load(good)
    meta["config"]["text_len"] = -1
    (good / "tokenizer_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="text_len"):
        TextTokenizer.load(good)


# --- CLI ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    # Only this group: keeps these tests independent of the other command groups' imports.
    monkeypatch.setattr(dalle.cli, "COMMAND_MODULES", ["dalle.commands.tokenizer"])
    return dalle.cli.main


def test_cli_train_from_caption_file_and_encode(cli, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_bytes("\n".join(CORPUS).encode() + b"\n\n\xff\xfe not utf-8\n" + "a dog 🐕\n".encode())
    out = tmp_path / "tok"
    rc = cli(["tokenizer", "train", "--captions", str(captions), "--out", str(out), "--vocab-size", "500",
              "--text-len", "8"])
    printed = capsys.readouterr().out
    assert rc == 0
    tok = TextTokenizer.load(out)
    assert tok.text_len == 8 and f"vocabulary size: {tok.vocab_size}" in printed
    assert "2 skipped" in printed and "empty caption" in printed and "undecodable caption" in printed
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["captions"]["kept"] == len(CORPUS) + 1 and stats["vocab_size"] == tok.vocab_size
    assert 0 < stats["truncated_fraction"] < 1 and "truncated at text_len=8" in printed

    rc = cli(["tokenizer", "encode", "--tokenizer", str(out), "A Red Circle", "x " * 40])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"ids:    {tok.token_ids('a red circle')}" in printed
    assert "padding: positions" in printed and "truncated:" in printed

    assert cli(["tokenizer", "train", "--captions", str(captions), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_train_from_a_dataset_source_reads_captions_only(cli, tmp_path, capsys, monkeypatch):
    def no_image():
        raise AssertionError("the tokenizer must not decode images")
    records = [Record(f"r{i}", caption, no_image) for i, caption in enumerate(CORPUS)]
    records += [Record("none", None, no_image), Record("bad", b"\xff\xfe\x00\xd8", no_image),
                Record("blank", "  ", no_image), Record("bytes", b"a red circle", no_image),
                Record("short", "circle", no_image)]

    class FakeSource:
        name = "fake"

        def records(self, shard=0, num_shards=1):
            return iter(records)
    monkeypatch.setattr("dalle.commands.tokenizer.open_source", lambda cfg: FakeSource())
    out = tmp_path / "tok"
    rc = cli(["tokenizer", "train", "--data-source", "fake", "--out", str(out), "--vocab-size", "400",
              "--data-min-caption-words", "2"])
    printed = capsys.readouterr().out
    assert rc == 0 and f"{len(CORPUS) + 1} of {len(records)} records used, 4 skipped" in printed
    assert "caption too short" in printed
    assert TextTokenizer.load(out).vocab_size <= 400


def test_cli_train_on_shapes(cli, tmp_path, capsys):
    pytest.importorskip("dalle.data.shapes")
    rc = cli(["tokenizer", "train", "--data-source", "shapes", "--data-size", "200", "--out", str(tmp_path)])
    assert rc == 0 and "200 of 200 records used" in capsys.readouterr().out
    assert TextTokenizer.load(tmp_path).vocab_size > 257


def test_cli_errors(cli, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["train", "--captions", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")], "does not exist"),
        (["train", "--captions", str(empty), "--out", str(tmp_path / "b")], "no captions"),
        (["train", "--captions", str(empty), "--data-source", "shapes", "--out", str(tmp_path / "c")], "either"),
        (["train", "--captions", str(empty), "--out", str(tmp_path / "d"), "--text-len", "0"], "text_len"),
        (["encode", "--tokenizer", str(tmp_path / "missing"), "a cat"], "no text tokenizer"),
    ]
    for argv, message in cases:
        assert cli(["tokenizer", *argv]) == 2
        assert message in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text("{}")
    assert cli(["tokenizer", "encode", "--tokenizer", str(corrupt), "a cat"]) == 2
    assert "cannot read text tokenizer" in capsys.readouterr().err
