import os

# Before torch loads OpenMP, as the `dalle` command does: spinning idle threads stall tests on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests must be deterministic and must not fight over the 2 cores of CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")  # module-wide, so that a module's expensive shared fixtures run with it too
def one_thread():
    """For modules of tiny tensors or thousands of tiny ops (sampling): one thread is faster than two, computes the
    same numbers, and does not stall when other programs share the cores (10-100x slower with two, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _auto_amp_is_fp32():
    """``--amp auto`` trains in bf16 on a CPU with bf16 arithmetic. In-process tests hold runs to each other with fp32
    tolerances, so there ``auto`` is fp32 on every machine (session-wide: module fixtures train too); tests of bf16
    ask for it by name, and those that start processes of their own pass ``amp="none"``."""
    from dalle.training import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "native_bf16", lambda device: False)
        yield


# The GPU runs of the tests that take ``device``. CI has no GPU: there they run on the CPU only.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test that takes this runs on the CPU and, on a machine with one, on the GPU too (TF32 off, so that
    comparisons with a full-precision reference keep their tolerances)."""
    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(request.param)


def shapes_tokenizer(records: int = 300, vocab_size: int = 300, text_len: int = 16):
    """A BPE tokenizer trained on the captions of the first ``records`` shapes training records."""
    import itertools

    from dalle.data.config import DataConfig
    from dalle.data.registry import open_source
    from dalle.tokenizers.text import TextTokenizer, TextTokenizerConfig

    captions = (r.caption for r in itertools.islice(open_source(DataConfig(size=records)).records(), records))
    return TextTokenizer.train(captions, TextTokenizerConfig(vocab_size=vocab_size, text_len=text_len))


# A CLIP BPE vocabulary of a few merges, in the format of bpe_simple_vocab_16e6.txt.gz (a version line, then merges).
TINY_CLIP_MERGES = ("t h", "th e</w>", "r e", "re d</w>", "b l", "bl u", "blu e</w>", "s q", "sq u", "squ a", "squa r",
                    "squar e</w>")


def tiny_clip(path, resnet: bool = False, quick_gelu: bool = True):
    """Writes ``path/clip.bin`` (an open_clip-style state dict of a random CLIP) and ``path/vocab.txt.gz``;
    returns (checkpoint, vocab, model)."""
    import gzip
    import math

    from dalle.models.clip import ClipConfig, ClipModel

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt.gz"
    merges = TINY_CLIP_MERGES
    with gzip.open(vocab, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    # Head counts as the loader infers them from the widths (64-wide heads, at least one).
    config = ClipConfig(embed_dim=16, image_resolution=64 if resnet else 32,
                        vision_layers=(1, 1, 1, 1) if resnet else 2, vision_width=16 if resnet else 32,
                        vision_patch_size=None if resnet else 8, vision_heads=8 if resnet else 1, context_length=16,
                        vocab_size=512 + len(merges) + 2, text_width=32, text_heads=1, text_layers=1,
                        activation="quick_gelu" if quick_gelu else "gelu")
    model = ClipModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith(("ln_1.weight", "ln_2.weight")) else p.normal_(0, 0.1)
        model.logit_scale.fill_(math.log(1 / 0.07))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path / "clip.bin")
    return path / "clip.bin", vocab, model
