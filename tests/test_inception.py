import pytest
import torch

from dalle.errors import UserError
from dalle.evaluation.features import Classifier, build_extractor
from dalle.evaluation.inception import InceptionV3, fid_avg_pool


@pytest.fixture(scope="module")
def model():
    return InceptionV3()


def test_layout_is_the_fid_inception(model):
    # torchvision's Inception-v3 without the auxiliary head has 23,834,568 parameters with 1000 classes; the FID
    # graph has 1008 classes, 8 · (2048 + 1) more.
    assert sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2049
    keys = model.state_dict().keys()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.bias", "fc.weight"):
        assert key in keys
    assert model.Conv2d_1a_3x3.bn.eps == 0.001
    assert model.Mixed_7b.max_pool is False and model.Mixed_7c.max_pool is True
    assert isinstance(model, Classifier) and model.name == "InceptionV3"


def test_forward_shapes_with_random_weights(model):
    feats, logits = model.features_and_logits(torch.rand(1, 3, 32, 32))
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLU outputs
    torch.testing.assert_close(logits, model.fc(feats))


def test_fid_average_pool_excludes_padding():
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(fid_avg_pool(x), x)  # padding excluded from the mean: a constant map stays constant


def test_loads_a_state_dict_file_with_weights_only(tmp_path, model):
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # the published file has none
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # an auxiliary head is ignored
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(state, path)
    loaded = build_extractor("inception-v3", path)
    torch.testing.assert_close(loaded.fc.weight, state["fc.weight"])
    assert not loaded.training


def test_bad_weight_files_are_user_errors(tmp_path, model):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, wrong)
    with pytest.raises(UserError, match="missing"):
        InceptionV3.from_file(wrong)
    shaped = {k: v for k, v in model.state_dict().items()}
    shaped["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(shaped, tmp_path / "shaped.pth")
    with pytest.raises(UserError, match="fc.weight"):
        InceptionV3.from_file(tmp_path / "shaped.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load"):
        InceptionV3.from_file(tmp_path / "garbage.pth")

