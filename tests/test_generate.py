"""The text-to-image pipeline (Generator) and `dalle generate` / `dalle complete`: reranking, seeds and batching,
completion keeping the prompt rows, the output files, and one-line errors for bad input."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shapes_tokenizer, tiny_clip
from dalle.cli import main
from dalle.errors import UserError
from dalle.generation import Generation, Generator
from dalle.models.clip import ClipReranker
from dalle.models.dvae import DVAE, DVAEConfig
from dalle.models.reranker import ContrastiveModel, Reranker, RerankerConfig
from dalle.models.sampling import SampleConfig
from dalle.models.transformer import PriorTransformer, preset
from dalle.tokenizers.clip_bpe import ClipTokenizer

# 16 px images → a 4×4 grid of 32 codes: the "test" prior preset's grid and codebook.
TINY_DVAE = DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=3, codebook_size=32, n_init=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A `dalle pipeline`-shaped run with random tiny models: RUN/tokenizer, RUN/{dvae,prior,reranker}/model."""
    root = tmp_path_factory.mktemp("run")
    tok = shapes_tokenizer(text_len=8)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    DVAE(TINY_DVAE).save_pretrained(root / "dvae" / "model")
    PriorTransformer(preset("test", text_vocab_size=tok.vocab_size)).save_pretrained(root / "prior" / "model")
    reranker = RerankerConfig(resolution=16, image_patch=4, image_width=8, image_stages=2, text_dim=32,
                              text_n_layers=1, text_n_heads=2, embed_dim=16, vocab_size=tok.vocab_size, text_len=8)
    Reranker(ContrastiveModel(reranker).eval(), tok).save_pretrained(root / "reranker" / "model")
    return root


@pytest.fixture(scope="module")
def generator(run_dir):
    return Generator.from_run(run_dir)


def an_image(seed=0, size=(40, 30)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def test_generate_reranks_candidates(generator):
    (gen,) = generator.generate(["a red circle"], n=6, keep=3)
    assert isinstance(gen, Generation) and gen.caption == "a red circle"
    assert gen.images.shape == (3, 16, 16, 3) and gen.images.dtype == np.uint8
    assert gen.candidates.shape == (6, 16, 16, 3) and gen.candidate_scores.shape == (6,)
    assert gen.codes.shape == (3, 4, 4)
    order = np.argsort(-gen.candidate_scores, kind="stable")[:3]
    assert np.array_equal(gen.scores, gen.candidate_scores[order])
    assert np.all(np.diff(gen.scores) <= 0)  # best first
    assert np.array_equal(gen.images, gen.candidates[order])
    decoded = generator._decode(gen.codes)
    assert np.array_equal(decoded, gen.images)  # the kept codes are those of the kept images
    direct = generator.reranker.score(torch.from_numpy(gen.candidates), ["a red circle"] * 6).numpy()
    np.testing.assert_allclose(gen.candidate_scores, direct, rtol=1e-4, atol=1e-4)


def test_without_reranker_keeps_draw_order(run_dir, generator):
    plain = Generator.from_parts(generator.prior, generator.dvae, generator.tokenizer)
    (gen,) = plain.generate(["a red circle"], n=4, keep=2)
    assert gen.scores is None and gen.candidate_scores is None
    assert np.array_equal(gen.images, gen.candidates[:2])
    (ranked,) = generator.generate(["a red circle"], n=4, keep=2)
    assert np.array_equal(ranked.candidates, gen.candidates)  # the same draws, only the choice differs


def test_seeded_and_independent_of_batch_size_and_n(generator):
    captions = ["a red circle", "a blue square", "a red circle"]
    sample = SampleConfig(seed=3, temperature=0.8)
    first = generator.generate(captions, n=3, sample=sample)
    again = generator.generate(captions, n=3, sample=sample)
    generator.batch_size = 2
    try:
        rebatched = generator.generate(captions, n=5, sample=sample)
    finally:
        generator.batch_size = 16
    for a, b, c in zip(first, again, rebatched):
        assert np.array_equal(a.candidates, b.candidates)
        assert np.array_equal(a.candidates, c.candidates[:3])  # more candidates keep the first ones
    assert not np.array_equal(first[0].candidates, first[2].candidates)  # a repeated caption gets new draws
    other = generator.generate(captions[:1], n=3, sample=SampleConfig(seed=4))[0]
    assert not np.array_equal(other.candidates, first[0].candidates)


@pytest.mark.parametrize("n_captions,n,batch_size", [(5, 3, 8), (5, 3, 3), (4, 8, 256), (2, 7, 3), (3, 1, 2)])
def test_draw_batches_hold_equal_blocks_of_one_caption(n_captions, n, batch_size):
    from dalle.generation import _chunks
    chunks = _chunks(n_captions, n, batch_size)
    assert [row for chunk in chunks for row in chunk] == [(c, j) for c in range(n_captions) for j in range(n)]
    for chunk in chunks:
        assert 1 <= len(chunk) <= batch_size
        sizes = {c: sum(1 for r in chunk if r[0] == c) for c, _ in chunk}
        assert len(set(sizes.values())) == 1  # the decoder keeps one copy of each caption's keys


def test_precision_samples_a_converted_copy_of_the_prior(run_dir, generator):
    bf16 = Generator.from_parts(generator.prior, generator.dvae, generator.tokenizer, precision="bf16")
    assert bf16.precision == "bf16" and bf16.prior.image_head.weight.dtype == torch.bfloat16
    assert generator.precision == "fp32" and generator.prior.image_head.weight.dtype == torch.float32  # untouched
    (ours,) = bf16.generate(["a red circle"], n=2)
    assert ours.images.shape == (2, 16, 16, 3) and ours.images.dtype == np.uint8
    assert Generator.from_run(run_dir, precision="auto").precision == "fp32"  # the tests' auto (conftest.py)
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        Generator.from_run(run_dir, precision="fp8")


def test_bf16_decodes_under_autocast_close_to_fp32(generator, monkeypatch):
    bf16 = Generator.from_parts(generator.prior, generator.dvae, generator.tokenizer, precision="bf16")
    codes = torch.randint(0, generator.dvae.config.codebook_size, (3, generator.grid_size, generator.grid_size),
                          generator=torch.Generator().manual_seed(0))
    exact, fast = generator._decode(codes), bf16._decode(codes)
    assert fast.dtype == np.uint8 and fast.shape == exact.shape
    diff = np.abs(fast.astype(int) - exact.astype(int))
    assert diff.mean() < 2 and diff.max() <= 16  # bf16 keeps 8 significant bits

    seen = []
    decode = generator.dvae.decode
    monkeypatch.setattr(generator.dvae, "decode", lambda c: seen.append(torch.get_autocast_dtype("cpu")
                                                                         if torch.is_autocast_enabled("cpu")
                                                                         else None) or decode(c))
    generator._decode(codes), bf16._decode(codes)
    assert seen == [None, torch.bfloat16]  # fp32 decodes without autocast, bf16 under it


@pytest.mark.parametrize("keep_rows", [0, 1, 3, 4])
def test_completion_keeps_the_prompt_rows(generator, keep_rows):
    image = an_image()
    codes = generator.encode_image(image)  # (4, 4)
    gen = generator.complete(image, "a red circle", keep_rows, n=3, keep=2, sample=SampleConfig(seed=1))
    assert torch.equal(gen.codes[:, :keep_rows], codes[:keep_rows].expand(2, -1, -1))
    if keep_rows == 4:  # the whole grid given: the reconstruction
        assert all(np.array_equal(img, generator.reconstruct(image)) for img in gen.candidates)
    if keep_rows == 0:  # nothing given: plain generation
        plain = generator.generate(["a red circle"], n=3, keep=2, sample=SampleConfig(seed=1))[0]
        assert np.array_equal(plain.candidates, gen.candidates)


def test_prompt_codes_for_generate(generator):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gens = generator.generate(["a red circle", "a blue square"], n=2, prompt_codes=prompt)
    for g, p in zip(gens, prompt):
        assert torch.equal(g.codes.flatten(1)[:, :3], p.expand(2, -1))
    with pytest.raises(UserError, match="prompt_codes"):
        generator.generate(["a", "b"], prompt_codes=torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("call,message", [
    (lambda g: g.generate(["a red circle", "  "]), "caption 2 is empty"),
    (lambda g: g.generate([]), "no captions"),
    (lambda g: g.generate("a red circle"), "list of strings"),
    (lambda g: g.generate(["x"], n=2, keep=3), "keep <= n"),
    (lambda g: g.complete(an_image(), "x", 5), "between 0 and 4"),
    (lambda g: g.complete(an_image(), "x", -1), "between 0 and 4"),
    (lambda g: g.complete(an_image().astype(np.float32), "x", 1), "uint8"),
    (lambda g: g.complete(an_image()[..., :2], "x", 1), r"\(H, W, 3\)"),
])
def test_api_errors(generator, call, message):
    with pytest.raises(UserError, match=message):
        call(generator)


def test_parts_that_do_not_fit_are_refused(generator):
    other = DVAE(DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=2, codebook_size=32, n_init=8))
    with pytest.raises(UserError, match="not trained together"):
        Generator.from_parts(generator.prior, other, generator.tokenizer)


def test_from_run_errors(tmp_path, run_dir):
    with pytest.raises(UserError, match="does not exist"):
        Generator.from_run(tmp_path / "missing")
    (tmp_path / "partial" / "tokenizer").mkdir(parents=True)
    with pytest.raises(UserError, match="has no dvae"):
        Generator.from_run(tmp_path / "partial")


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_generate_writes_images_sheet_and_record(run_dir, tmp_path, capsys):
    captions_file = tmp_path / "captions.txt"
    # As a Windows editor saves it: a byte order mark and CRLF line ends.
    captions_file.write_text("a blue square\r\n\r\n  a red circle  \r\n", encoding="utf-8-sig")
    out = tmp_path / "out"
    rc = main(["generate", "a green triangle", "--captions-file", str(captions_file), "--run", str(run_dir),
               "--n", "4", "--keep", "2", "--seed", "5", "--top-k", "10", "--out", str(out), "--batch-size", "3",
               "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "generations.json").read_text())
    assert [g["caption"] for g in record["generations"]] == ["a green triangle", "a blue square", "a red circle"]
    assert record["seed"] == 5 and record["settings"]["sample"]["top_k"] == 10 and record["settings"]["n"] == 4
    assert record["models"]["prior"] == str(run_dir / "prior" / "model")
    assert record["precision"] == "fp32" and record["settings"]["precision"] == "auto"  # the tests' auto: fp32
    first = record["generations"][0]
    assert first["files"] == ["a-green-triangle/1.png", "a-green-triangle/2.png"]
    assert len(first["scores"]) == 2 and len(first["candidate_scores"]) == 4
    assert first["scores"][0] >= first["scores"][1] and first["scores"][0] == max(first["candidate_scores"])
    for g in record["generations"]:
        for f in g["files"]:
            assert Image.open(out / f).size == (16, 16)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 2 * 128 and sheet.height >= 3 * 128  # 2 columns, 3 rows of enlarged images
    assert "contact sheet" in capsys.readouterr().out


def test_cli_generate_says_when_a_caption_is_longer_than_the_prior_reads(run_dir, tmp_path, capsys):
    long = "a red circle " + "and a very long tail of words nobody trained on " * 4
    out = tmp_path / "out"
    assert main(["generate", long, "a red circle", "--run", str(run_dir), "--n", "1", "--out", str(out),
                 "--device", "cpu", "--no-rerank"]) == 0
    printed = capsys.readouterr().out
    assert "note: caption 1 is" in printed and "note: caption 2" not in printed
    first, second = json.loads((out / "generations.json").read_text())["generations"]
    assert first["caption_truncated"] and not second["caption_truncated"]
    assert first["caption_tokens"] > second["caption_tokens"] > 0


def test_cli_complete(run_dir, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(an_image(size=(50, 40))).save(image)
    out = tmp_path / "out"
    rc = main(["complete", str(image), "--caption", "a red circle", "--keep-rows", "2", "--run", str(run_dir),
               "--n", "3", "--out", str(out), "--device", "cpu", "--no-rerank"])
    assert rc == 0
    record = json.loads((out / "generations.json").read_text())
    assert record["command"] == "complete" and record["keep_rows"] == 2
    assert record["generations"][0]["scores"] is None and len(record["generations"][0]["files"]) == 3
    assert (out / "input.png").is_file() and (out / "contact_sheet.png").is_file()


def test_cli_complete_keeps_the_top_half_by_default(run_dir, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(an_image(size=(50, 40))).save(image)
    out = tmp_path / "out"
    assert main(["complete", str(image), "--caption", "a red circle", "--run", str(run_dir), "--n", "1",
                 "--out", str(out), "--device", "cpu", "--no-rerank"]) == 0
    grid = json.loads((run_dir / "prior" / "model" / "config.json").read_text())["grid_size"]
    assert json.loads((out / "generations.json").read_text())["keep_rows"] == grid // 2


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--run", "{tmp}/nowhere"], "run directory .* does not exist"),
    (["generate", "x"], "GenerateConfig.run: is required"),
    (["generate", "", "--run", "{run}"], "caption 1 is empty"),
    (["generate", "--run", "{run}"], "no captions"),
    (["generate", "--captions-file", "{tmp}/none.txt", "--run", "{run}"], "captions file .* does not exist"),
    (["generate", "x", "--run", "{run}", "--n", "2", "--keep", "3"], "GenerateConfig.keep"),
    (["generate", "x", "--run", "{run}", "--temperature", "0"], "SampleConfig.temperature"),
    (["generate", "x", "--prior", "{tmp}/p", "--dvae", "{tmp}/d"], "no such checkpoint directory"),
    (["complete", "{tmp}/missing.png", "--caption", "x", "--keep-rows", "1", "--run", "{run}"], "missing file"),
    (["complete", "{tmp}/text.png", "--caption", "x", "--keep-rows", "1", "--run", "{run}"], "not an image"),
    (["complete", "{img}", "--caption", "x", "--keep-rows", "9", "--run", "{run}"], "between 0 and 4"),
    (["complete", "{img}", "--caption", "x", "--keep-rows", "-1", "--run", "{run}"], "keep_rows"),
    (["complete", "{img}", "--caption", " ", "--keep-rows", "1", "--run", "{run}"], "CompleteConfig.caption"),
])
def test_cli_errors_are_one_line(run_dir, tmp_path, capsys, argv, message):
    (tmp_path / "text.png").write_text("not pixels")
    Image.fromarray(an_image()).save(tmp_path / "img.png")
    argv = [a.format(tmp=tmp_path, run=run_dir, img=tmp_path / "img.png") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_cli_generate_reranks_with_a_clip_checkpoint(run_dir, tmp_path):
    ckpt, vocab, model = tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    rc = main(["generate", "the red square", "--run", str(run_dir), "--reranker", str(ckpt), "--clip-vocab",
               str(vocab), "--clip-activation", "quick_gelu", "--n", "4", "--keep", "2", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "generations.json").read_text())
    assert record["models"]["reranker"] == str(ckpt)
    (gen,) = record["generations"]
    # The scores are the CLIP's: recompute them from the written candidates' order.
    scorer = ClipReranker(model, ClipTokenizer(vocab, model.config.context_length))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(out / f)) for f in gen["files"]]))
    assert np.allclose(scorer.score(images, ["the red square"] * 2).numpy(), gen["scores"], atol=1e-3)
