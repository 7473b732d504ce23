"""Heads and the model factory."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_metric_learning.losses import ArcFaceLoss

from src.config import ModelConfig
from src.models.backbones import ModelError
from src.models.factory import create_model
from src.models.heads import ArcFaceHead


def test_arcface_head_matches_pytorch_metric_learning():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 7, margin=0.5, scale=30.0)
    reference = ArcFaceLoss(num_classes=7, embedding_size=16, margin=math.degrees(0.5), scale=30.0)
    with torch.no_grad():
        reference.W.copy_(head.weight.t())
    embeddings = torch.randn(64, 16)
    labels = torch.randint(0, 7, (64,))
    # Force some targets past pi - m, where both switch to the monotonic fallback.
    embeddings[:4] = -head.weight[labels[:4]].detach()
    logits, loss_logits = head(embeddings, labels)
    assert torch.allclose(F.cross_entropy(loss_logits, labels), reference(embeddings, labels), atol=1e-5)
    assert torch.allclose(logits, reference.get_logits(embeddings), atol=1e-4)
    # Without labels (prediction, evaluation, inference) the head gives those same margin-free logits.
    assert all(torch.equal(unlabelled, logits) for unlabelled in head(embeddings))


def test_arcface_margin_lowers_only_the_target_logit():
    head = ArcFaceHead(8, 5, margin=0.5, scale=30.0)
    embeddings, labels = torch.randn(10, 8), torch.arange(10) % 5
    logits, loss_logits = head(embeddings, labels)
    target = F.one_hot(labels, 5).bool()
    assert torch.equal(logits[~target], loss_logits[~target])
    assert (loss_logits[target] < logits[target]).all()


@pytest.mark.parametrize("head", ["arcface", "linear"])
def test_model_outputs(head):
    model = create_model(ModelConfig(backbone="resnet18", head=head, embedding_dim=32), 6).eval()
    images = torch.randn(3, 3, 64, 64)
    embeddings, logits, _ = model(images)
    assert embeddings.shape == (3, 32) and logits.shape == (3, 6)
    normalised, same_logits = model.embed_and_classify(images)
    assert torch.allclose(normalised.norm(dim=1), torch.ones(3), atol=1e-5) and torch.equal(same_logits, logits)
    assert torch.allclose(normalised, torch.nn.functional.normalize(embeddings, dim=1))


@pytest.mark.parametrize("head", ["arcface", "linear"])
@pytest.mark.parametrize("num_classes", [0, -3, True, "5", 2.0, None])
def test_a_number_of_classes_that_is_not_a_positive_whole_number_is_a_model_error(head, num_classes):
    """0 built a model without classes; the others raised torch's TypeError or RuntimeError."""
    with pytest.raises(ModelError) as refused:
        create_model(ModelConfig(backbone="resnet18", head=head, pretrained=False), num_classes)
    assert str(refused.value) == (f"num_classes {num_classes!r}: the number of individuals must be a whole number, "
                                  "at least 1")


@pytest.mark.parametrize("wrapped", [False, True], ids=["state dict", "under a state_dict key"])
def test_pretrained_from_a_local_file(tmp_path, wrapped):
    reference = torchvision.models.resnet18(weights=None)
    state = reference.state_dict()
    torch.save({"state_dict": state} if wrapped else state, tmp_path / "r18.pth")
    model = create_model(ModelConfig(backbone="resnet18", pretrained=tmp_path / "r18.pth"), 4)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_pretrained_file_for_another_architecture_is_refused(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ModelError, match="do not fit resnet18"):
        create_model(ModelConfig(backbone="resnet18", pretrained=tmp_path / "r50.pth"), 4)


def test_pretrained_imagenet_unavailable_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    # The message names the file to fetch on another machine, not only the folder it goes in.
    with pytest.raises(ModelError, match=r"cannot get torchvision's ImageNet weights .* copy "
                                         r"https://download\.pytorch\.org/models/resnet18-\w+\.pth into "):
        create_model(ModelConfig(backbone="resnet18", pretrained=True), 4)


def test_pretrained_folder_is_named_as_such(tmp_path):
    with pytest.raises(ModelError, match="is a folder, not a weights file"):
        create_model(ModelConfig(backbone="resnet18", pretrained=tmp_path), 4)


def test_weights_of_another_shape_are_a_model_error_naming_them(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a 3x3 stem instead of 7x7
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match="0 missing, 0 unexpected, 1 of another shape"):
        create_model(ModelConfig(backbone="resnet18", pretrained=path), 4)


@pytest.mark.parametrize("unusual", [lambda weight: torch.empty_like(weight, device="meta"), torch.Tensor.to_sparse])
def test_weights_that_are_not_dense_tensors_are_a_model_error(tmp_path, unusual):
    """weights_only loads them; load_state_dict then raised a RuntimeError (a traceback)."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = unusual(state["conv1.weight"])
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match="does not hold a state dict of dense tensors"):
        create_model(ModelConfig(backbone="resnet18", pretrained=path), 4)


def test_the_configured_dropout_reaches_the_neck():
    model = create_model(ModelConfig(backbone="resnet18", pretrained=False, dropout=0.3), 4)
    assert model.neck[0].p == 0.3


def test_arcface_head_uses_the_configured_margin_and_scale_even_at_a_class_centre():
    """An embedding on its class centre has cosine 1 (a little more in float32, hence the clamp): its
    logit is the scale, its loss logit scale * cos(margin), for a margin and scale that are not the defaults."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", embedding_dim=16, arcface_margin=0.3, arcface_scale=16.0)
    head = create_model(config, 50).head
    centres = head.weight.detach().clone()
    logits, loss_logits = head(centres, torch.arange(50))
    assert torch.allclose(logits.diagonal(), torch.full((50,), 16.0), atol=1e-4)
    # acos is steep at 1: a cosine rounded to 1 - 1e-7 in float32 is an angle of 5e-4, hence the tolerance
    assert torch.allclose(loss_logits.diagonal(), torch.full((50,), 16.0 * math.cos(0.3)), atol=0.01)


def test_the_models_forward_puts_the_arcface_margin_on_the_target_class():
    """Training calls the model, not the head: the labels must reach the head, or the margin is lost."""
    model = create_model(ModelConfig(backbone="resnet18", embedding_dim=16), 5).eval()
    labels = torch.arange(4)
    _, logits, loss_logits = model(torch.randn(4, 3, 32, 32), labels)
    target = F.one_hot(labels, 5).bool()
    assert (loss_logits[target] < logits[target]).all() and torch.equal(loss_logits[~target], logits[~target])


def test_pretrained_file_missing_weights_is_a_model_error_naming_them(tmp_path):
    """Loading the rest would leave the missing layers at their random initialisation without a word."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.weight"]
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match="1 missing, 0 unexpected, 0 of another shape"):
        create_model(ModelConfig(backbone="resnet18", pretrained=path), 4)
