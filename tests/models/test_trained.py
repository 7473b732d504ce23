"""Reading a training checkpoint back (`src.models.trained`): what must be refused, and what must not be fetched."""
import pytest
import torch

from src.config import Config, ModelConfig
from src.models import backbones
from src.models.factory import create_model
from src.models.trained import FORMAT_VERSION, load_checkpoint, load_trained
from src.safe_load import CheckpointError

CLASSES = ["Alex", "Bambari", "Corrie"]


def save_checkpoint(path, model_config: ModelConfig, **changes):
    """A checkpoint as training writes it, of a small model with random weights."""
    model = create_model(model_config.model_copy(update={"pretrained": False}), len(CLASSES))
    checkpoint = {"format_version": FORMAT_VERSION, "model_state": model.state_dict(), "epoch": 1,
                  "config": Config(model=model_config).to_dict(), "classes": CLASSES, **changes}
    torch.save(checkpoint, path)
    return model


def test_a_model_trained_from_imagenet_weights_loads_without_fetching_them(tmp_path, monkeypatch):
    """The guide's three configs set model.pretrained: true; the checkpoint's weights replace ImageNet's,
    so evaluation and inference must run offline."""
    def offline(name):
        raise backbones.ModelError("model.pretrained: cannot get torchvision's ImageNet weights (offline)")

    monkeypatch.setattr(backbones, "_imagenet_weights", offline)
    saved = save_checkpoint(tmp_path / "x_best.pt", ModelConfig(pretrained=True, embedding_dim=16))
    loaded = load_trained(tmp_path / "x_best.pt", torch.device("cpu")).model
    assert torch.equal(loaded.head.weight, saved.head.weight)


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    """Loading the rest would leave the missing weights at their random initialisation."""
    model = create_model(ModelConfig(embedding_dim=16), len(CLASSES))
    state = model.state_dict()
    del state["neck.2.weight"]
    save_checkpoint(tmp_path / "x_best.pt", ModelConfig(embedding_dim=16), model_state=state)
    with pytest.raises(CheckpointError, match=r"weights do not fit the model its config describes \(.*neck\.2\.weight"):
        load_trained(tmp_path / "x_best.pt", torch.device("cpu"))


@pytest.mark.parametrize("changes, message", [
    ({"format_version": FORMAT_VERSION + 1}, f"checkpoint format {FORMAT_VERSION + 1} is newer than this code"),
    ({"epoch": True}, "malformed epoch: bool"),
])
def test_a_checkpoint_of_a_newer_format_or_a_malformed_field_is_refused(tmp_path, changes, message):
    save_checkpoint(tmp_path / "x_best.pt", ModelConfig(embedding_dim=16), **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "x_best.pt")


@pytest.mark.parametrize("weight", [torch.zeros(2, dtype=torch.int8), torch.tensor([float("nan")])],
                         ids=["int8", "nan"])
def test_a_long_weight_name_of_a_crafted_checkpoint_is_clipped_in_its_error(tmp_path, weight):
    """The name was repeated whole: a 1 MB name made a 1 MB "one-line" error."""
    model = create_model(ModelConfig(embedding_dim=16), len(CLASSES))
    save_checkpoint(tmp_path / "x_best.pt", ModelConfig(embedding_dim=16),
                    model_state={**model.state_dict(), "w" * 10**6: weight})
    with pytest.raises(CheckpointError, match="not a|NaN") as info:
        load_checkpoint(tmp_path / "x_best.pt")
    assert len(str(info.value)) < 500 and "www..." in str(info.value)


def test_evaluation_and_inference_read_a_checkpoint_without_its_optimizer_state(tmp_path, monkeypatch):
    """load_trained read the whole file into memory and kept it (a resnet50 with AdamW: ~300 MB, two
    thirds of it optimizer state that neither evaluation nor inference uses); memory-mapped, only the
    weights are read."""
    import src.safe_load

    saved = save_checkpoint(tmp_path / "x_best.pt", ModelConfig(embedding_dim=16), optimizer_state={"m": torch.ones(8)})
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(src.safe_load.torch, "load", lambda path, **kwargs: loads.append(kwargs.get("mmap"))
                        or torch_load(path, **kwargs))
    loaded = load_trained(tmp_path / "x_best.pt", torch.device("cpu")).model
    assert loads == [True] and torch.equal(loaded.head.weight, saved.head.weight)


def test_a_checkpoint_is_checked_for_the_zip_format_once(tmp_path, monkeypatch):
    """safe_torch_load opened the file to read its first bytes twice: for the zip-bomb guard and for mmap."""
    import src.safe_load

    save_checkpoint(tmp_path / "x_best.pt", ModelConfig(embedding_dim=16))
    checked = []
    is_zip = src.safe_load._is_zip
    monkeypatch.setattr(src.safe_load, "_is_zip", lambda path: checked.append(path) or is_zip(path))
    assert load_trained(tmp_path / "x_best.pt", torch.device("cpu")).classes.names == tuple(CLASSES)
    assert checked == [tmp_path / "x_best.pt"]


class Crafted:
    """An object a safe load must refuse (unpickling a class can run code)."""


def test_a_checkpoint_of_torchs_legacy_format_is_read_whole_and_still_checked(tmp_path):
    """torch can map only its zip format: files of the older one (torch < 1.6) load as before, and a
    crafted one is still refused as unsafe (not "damaged", from torch's complaint about mmap)."""
    model = create_model(ModelConfig(embedding_dim=16), len(CLASSES))
    checkpoint = {"format_version": FORMAT_VERSION, "model_state": model.state_dict(), "epoch": 1,
                  "config": Config(model=ModelConfig(embedding_dim=16)).to_dict(), "classes": CLASSES}
    torch.save(checkpoint, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = load_trained(tmp_path / "legacy.pt", torch.device("cpu")).model
    assert torch.equal(loaded.head.weight, model.head.weight)
    torch.save({**checkpoint, "x": Crafted()}, tmp_path / "crafted.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a safe checkpoint"):
        load_checkpoint(tmp_path / "crafted.pt", mmap=True)
