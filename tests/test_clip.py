"""A user's CLIP checkpoint as the reranker: parity with open_clip, safe loading of every file format, the tokenizer."""

import importlib.machinery
import importlib.util
import io
import json
import pickle
import sys
import types
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_clip
from dalle.checkpoint import read_torchscript_tensors
from dalle.cli import main
from dalle.errors import UserError
from dalle.models.clip import ClipModel, ClipReranker, load_clip_model
from dalle.models.reranker import load_reranker
from dalle.tokenizers.clip_bpe import ClipTokenizer, find_vocab


@pytest.fixture(scope="module")
def open_clip():
    """open_clip's model and tokenizer modules, imported without its package __init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    saved = {k: v for k, v in sys.modules.items() if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))}
    stubs = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    stand_in = importlib.machinery.ModuleSpec("open_clip", None, is_package=True)
    stand_in.submodule_search_locations = list(spec.submodule_search_locations)
    package = importlib.util.module_from_spec(stand_in)
    sys.modules.update({**stubs, "open_clip": package})
    try:
        model = importlib.import_module("open_clip.model")
        tokenizer = importlib.import_module("open_clip.tokenizer")
        yield types.SimpleNamespace(model=model, tokenizer=tokenizer)
    finally:
        for name in [k for k in sys.modules if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_embeddings_equal_open_clip_with_the_same_weights(open_clip, tower, tmp_path):
    vision = (dict(image_size=32, layers=2, width=128, patch_size=8) if tower == "vit"
              else dict(image_size=64, layers=[1, 2, 1, 1], width=16))
    quick_gelu = tower == "vit"  # both activations are covered
    ref = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, quick_gelu=quick_gelu,
                               text_cfg=dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    ours = load_clip_model(tmp_path / "open_clip_pytorch_model.bin", "quick_gelu" if quick_gelu else "gelu")
    images = torch.randn(3, 3, vision["image_size"], vision["image_size"])
    ids = torch.randint(1, 98, (3, 16))
    ids[torch.arange(3), torch.tensor([3, 9, 15])] = 99  # end-of-text: the largest id
    with torch.no_grad():
        want_image = torch.nn.functional.normalize(ref.encode_image(images), dim=-1)
        want_text = torch.nn.functional.normalize(ref.encode_text(ids), dim=-1)
        assert torch.allclose(ours.encode_image(images), want_image, atol=1e-5)
        assert torch.allclose(ours.encode_text(ids), want_text, atol=1e-5)
    # The wrong activation is a different model: the option matters.
    other = load_clip_model(tmp_path / "open_clip_pytorch_model.bin", "gelu" if quick_gelu else "quick_gelu")
    with torch.no_grad():
        assert not torch.allclose(other.encode_text(ids), want_text, atol=1e-3)


def test_tokenizer_gives_open_clips_ids(open_clip):
    vocab = find_vocab()  # from the installed open_clip package
    ours, ref = ClipTokenizer(vocab), open_clip.tokenizer.SimpleTokenizer(str(vocab))
    captions = ["a red Circle, isn't it? 3.5 £", "A  photo   of a café &amp; 東京 tower 🙂", "x" * 300,
                "there's a large blue square above a small green triangle", "don't WE'LL they've", "", "#tag_1 @user"]
    assert ours.vocab_size == len(ref.encoder) == 49408
    assert torch.equal(ours.encode_batch(captions), ref(captions))


def test_tokenizer_frames_pads_and_cuts(tmp_path):
    _, vocab, _ = tiny_clip(tmp_path)
    tok = ClipTokenizer(vocab, context_length=6)
    ids = tok.encode_batch(["The RED  square", "red " * 10])
    start, end = tok.vocab_size - 2, tok.vocab_size - 1
    red, square = tok.encode("red"), tok.encode("square")
    assert len(red) == 1 and len(square) == 1  # whole words by the merges
    assert ids[0].tolist() == [start, *tok.encode("the"), *red, *square, end, 0]
    assert ids[1].tolist() == [start, *red * 4, end]  # cut, with end-of-text kept last
    with pytest.raises(UserError, match="not a CLIP BPE vocabulary|cannot read"):
        (tmp_path / "bad.gz").write_bytes(b"not gzip")
        ClipTokenizer(tmp_path / "bad.gz")


class Traceable(ClipModel):
    def forward(self, images, ids):
        return self.encode_image(images), self.encode_text(ids)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("fmt", ["bin", "safetensors", "torchscript", "open_clip_dir"])
def test_every_checkpoint_format_loads_the_same_model(fmt, tmp_path):
    ckpt, vocab, model = tiny_clip(tmp_path / "src", quick_gelu=fmt != "open_clip_dir")
    state = model.state_dict()
    if fmt == "bin":
        path = ckpt  # {"state_dict": {"module.…": …}}, a training checkpoint of open_clip
    elif fmt == "safetensors":
        path = tmp_path / "clip.safetensors"
        save_file(state, str(path))
    elif fmt == "torchscript":  # OpenAI's released format, stored in half precision as theirs are
        traced = Traceable(model.config).eval()
        traced.load_state_dict(state)
        path = tmp_path / "ViT-tiny.pt"
        torch.jit.trace(traced.half(), (torch.randn(1, 3, 32, 32).half(), torch.ones(1, 16, dtype=torch.long))
                        ).save(str(path))
        state = {k: v.half().float() for k, v in state.items()}
    else:  # a Hugging Face hub directory of open_clip: the config says GELU
        path = tmp_path / "hub"
        path.mkdir()
        save_file(state, str(path / "open_clip_model.safetensors"))
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    # A bare state dict does not say its activation (open_clip's default is GELU); the others do.
    loaded = load_clip_model(path, "quick_gelu" if fmt in ("bin", "safetensors") else None)
    assert loaded.config == model.config
    if fmt == "bin":
        assert load_clip_model(path).config.activation == "gelu"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_torchscript_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(UserError, match="unsupported global .*print"):
        read_torchscript_tensors(path)
    with pytest.raises(UserError, match="refusing"):
        load_reranker(path)


def test_clip_reranks_like_its_embeddings(tmp_path):
    ckpt, vocab, model = tiny_clip(tmp_path, resnet=True)
    scorer = load_reranker(ckpt, clip_vocab=vocab)
    assert isinstance(scorer, ClipReranker) and scorer.resolution == 64 and scorer.embed_dim == 16
    images = torch.rand(5, 3, 48, 48)  # resized to the model's 64 px
    caption = "the red square"
    scores = scorer.score(images, [caption] * 5)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    # The random tiny towers score these images within about 1e-6 of each other, so which of two near-equal scores
    # comes first depends on the CPU's rounding: compare the scores reranking picks, not their indices.
    picked = scorer.rerank(images, caption, keep=3)
    assert len(set(picked.tolist())) == 3
    assert torch.allclose(scores[picked], scores.sort(descending=True).values[:3], rtol=0, atol=1e-5)
    assert scorer.scale == pytest.approx(1 / 0.07, rel=1e-4)
    uint8 = (images.permute(0, 2, 3, 1) * 255).round().byte()
    assert torch.allclose(scorer.score(uint8, [caption] * 5), scores, atol=0.05)


def test_clip_errors_are_clear(tmp_path):
    ckpt, vocab, _ = tiny_clip(tmp_path)
    with pytest.raises(UserError, match="missing.gz does not exist"):
        load_reranker(ckpt, clip_vocab=tmp_path / "missing.gz")
    real_size = tmp_path / "other.txt.gz"
    import gzip

    with gzip.open(real_size, "wt") as f:
        f.write("#version\nt h\n")
    with pytest.raises(UserError, match="vocabulary has 515 tokens"):
        load_reranker(ckpt, clip_vocab=real_size)
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "partial.bin")
    with pytest.raises(UserError, match="not a reranker"):
        load_reranker(tmp_path / "partial.bin")
    with pytest.raises(UserError, match="does not exist"):
        load_reranker(tmp_path / "nothing")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text("{not json")
    (hub / "open_clip_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot read"):
        load_clip_model(hub)


def test_cli_reranker_eval_takes_a_clip_checkpoint(tmp_path, capsys):
    ckpt, vocab, _ = tiny_clip(tmp_path)
    args = ["reranker", "eval", "--model", str(ckpt), "--clip-vocab", str(vocab), "--pairs", "8",
            "--data-size", "200", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 8 and 0 <= result["i2t_top1"] <= 1
    assert main(["reranker", "eval", "--model", str(ckpt), "--clip-vocab", str(tmp_path / "no.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_describe_reads_no_pickled_code(tmp_path):
    buf = io.BytesIO()
    torch.save({"visual.conv1.weight": torch.zeros(2)}, buf)
    (tmp_path / "x.pt").write_bytes(buf.getvalue())
    with pytest.raises(UserError):
        load_clip_model(tmp_path / "x.pt")
