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
