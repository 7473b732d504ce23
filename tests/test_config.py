"""The config schema: the guide's keys, defaults, and one-line errors naming the key."""
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from src.config import Config, ConfigError, ModelConfig, TrainerConfig, flatten, load_config
from src.models.heads import HEADS
from src.models.scoring import HEAD_SCORES, MATCH_MODES, MATCHES
from src.training import train
from src.training.train import OPTIMIZERS
from tests.conftest import REPO

ROOT = Path(__file__).resolve().parents[1]
GUIDE_CONFIGS = {
    "train_chimp_min10": ("resnet18", 50, None),
    "train_chimp_min10_resnet50_arc": ("resnet50", 30, 128),
    "train_chimp_min10_resnet50_arc_full": ("resnet50", 200, None),
}


@pytest.mark.parametrize("name", sorted(GUIDE_CONFIGS))
def test_guide_configs_match_the_guide(name):
    backbone, epochs, batch = GUIDE_CONFIGS[name]
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.name == name
    assert config.model.backbone == backbone and config.model.head == "arcface"
    assert config.trainer.max_epochs == epochs
    assert config.data.num_classes == 87
    if batch:
        assert config.trainer.batch_size == batch


def test_the_schema_offers_exactly_the_registered_heads_and_optimizers():
    """A name added to a registry but not to the schema could never be configured, and the reverse
    would pass validation only to fail when the model or optimizer is built. (The backbones'
    registry is the schema's list itself.)"""
    assert set(get_args(ModelConfig.model_fields["head"].annotation)) == set(HEADS) == set(HEAD_SCORES)
    assert tuple(MATCHES) == MATCH_MODES
    assert set(get_args(TrainerConfig.model_fields["optimizer"].annotation)) == set(OPTIMIZERS)


def test_defaults_fill_missing_sections(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text("trainer:\n  max_epochs: 3\n")
    config = load_config(path)
    assert config.trainer.max_epochs == 3
    assert config.trainer.lr == Config().trainer.lr
    assert config.data.cache_folder == config.data.root / "cache"
    config.data.root = Path("elsewhere")  # the default follows the root, also when changed after loading
    assert config.data.cache_folder == Path("elsewhere") / "cache"


def test_unparseable_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"not found: .*absent.yaml$"):  # nothing close: no suggestion
        load_config(tmp_path / "absent.yaml")
    if Path("/dev/null").exists():  # `--config <(...)` is a pipe: it was "config file not found"
        with pytest.raises(ConfigError, match=r"^/dev/null: not a regular file \(a pipe or a device"):
            load_config("/dev/null")


def test_a_config_path_the_system_cannot_look_up_is_one_line():
    """A name over 255 bytes (or a folder this user cannot search): `Path.is_dir` raised a traceback."""
    with pytest.raises(ConfigError, match=r"^a{300}\.yaml: not a usable config path \(File name too long\)$"):
        load_config("a" * 300 + ".yaml")


@pytest.mark.parametrize("given", ["configs/train_chimp_min10.yml", "train_chimp_min10", "configs/train_chimp_min1"])
def test_a_missing_config_names_the_closest_one(tmp_path, monkeypatch, given):
    """A typo, a left-out folder or extension: the line said only "config file not found"."""
    (tmp_path / "configs").mkdir()
    for name in ("train_chimp_min10.yaml", "demo_standin.yaml"):
        (tmp_path / "configs" / name).write_text("trainer: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"^config file not found: {given} "
                                          r"\(did you mean configs/train_chimp_min10.yaml\?\)$"):
        load_config(given)


def test_a_config_beside_the_missing_one_is_suggested_before_one_in_configs(tmp_path):
    """The two folders were a set, whose order follows the string hash: with the same name in both, the
    suggestion changed from run to run (PYTHONHASHSEED=1 named configs/ over the file beside it)."""
    for folder in ("configs", "other"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "demo.yaml").write_text("trainer: {}\n")
    probe = ("from src.config import load_config\n"
             "try:\n    load_config('other/demo.yml')\nexcept ValueError as exc:\n    print(exc)")
    for seed in range(4):
        result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                                env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(REPO)}, timeout=60)
        assert result.stdout == "config file not found: other/demo.yml (did you mean other/demo.yaml?)\n", result


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "bad.yaml: not UTF-8 text"),                   # an image passed as --config
    (b"trainer:\n  seed: 99999999999999999999999\n", "'trainer.seed'"),          # beyond torch.manual_seed
])
def test_unusable_configs_exit_2_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                        if p.name != "labels_fix_example.yaml"))
def test_every_shipped_training_config_validates(path):
    assert load_config(ROOT / "configs" / path).name == Path(path).stem


@pytest.mark.parametrize("text, needle", [
    ("trainer:\n  max_epochs: yes\n", "'trainer.max_epochs': Input should be a number, not true/false"),
    ("trainer:\n  lr: true\n", "'trainer.lr': Input should be a number, not true/false"),
    ("trainer:\n  warmup_epochs: .inf\n", "'trainer.warmup_epochs': Input should be a finite number"),
    ("trainer:\n  lr: .inf\n", "'trainer.lr': Input should be a finite number"),
    ("trainer:\n  batch_size: 1\n", "'trainer.batch_size'"),
    ("name: ../elsewhere\n", "'name': must be usable as a file name"),
    ("name: runs/a\n", "'name': must be usable as a file name"),
    # a traceback (File name too long) before training, or a failed first checkpoint after an epoch
    (f"name: {'a' * 201}\n", "'name': is 201 bytes long; at most 200: file names hold 255 bytes"),
    ("name: ''\n", "'name': must be usable as a file name"),
    ("name: \"a\\nb\"\n", "'name': must be usable as a file name"),
    *[(f"name: '{name}'\n", "'name': must be usable as a file name") for name in ("a\\b", ".", "..", "  ")],
    ("model:\n  embedding_dim: 2000000000\n", "'model.embedding_dim': Input should be less than or equal to 8192"),
    ("trainer:\n  lr: 0.1\ntrainer:\n  max_epochs: 3\n", "bad.yaml:3: not valid YAML ('trainer' is given twice)"),
    ("trainer:\n  lr: 0.1\n  lr: 0.2\n", "bad.yaml:3: not valid YAML ('lr' is given twice)"),
    ("", "empty config"),
    ("# all commented out\n", "empty config"),
    # A misspelt key names the key meant (it said only "unknown key").
    ("trainer:\n  max_epoch: 3\n", "unknown key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"),
    ("trainr: {}\n", "unknown key 'trainr' (did you mean 'trainer'?)"),
    ("trainer:\n  lr: fast\n", "trainer.lr"),
    ("model:\n  head: softmax\n", "model.head"),
    ("trainer:\n  device: tpu\n", "trainer.device"),
    ("data:\n  num_classes: 0\n", "data.num_classes"),
    ("optimiser: {}\n", "optimiser"),
    ("trainer:\n  compile_mode: turbo\n", "trainer.compile_mode"),
    # YAML 1.1 would read 1:20 as 80 (base 60).
    ("trainer:\n  max_epochs: 1:20\n", "'trainer.max_epochs': Input should be a valid integer, unable to parse string "
     "as an integer (got '1:20')"),
    ("trainer:\n  max_epochs: 3\n  warmup_epochs: 5\n",
     "'trainer.warmup_epochs': must be at most trainer.max_epochs (3)"),
    # Path("") is the current folder: the run wrote its checkpoints (or its image cache) there.
    *[(f"{section}:\n  {key}: ''\n", f"'{section}.{key}': an empty path (it would mean the current folder)")
      for section, key in (("trainer", "output_dir"), ("data", "cache_dir"), ("data", "root"),
                           ("model", "pretrained"))],
    # Every numeric bound, at a value just outside it (dropping one from the config passed before).
    *[(f"{key.split('.')[0]}:\n  {key.split('.')[1]}: {value}\n", f"'{key}': Input should be")
      for key, value in (("data.num_classes", 1), ("data.image_size", 31), ("data.image_size", 1025),
                         ("data.workers", -1), ("augment.crop_scale_min", 0), ("augment.crop_scale_min", 1.01),
                         ("augment.hflip", -0.1), ("augment.hflip", 1.01), ("augment.color_jitter", -0.1),
                         ("augment.color_jitter", 1.01), ("augment.rotation_degrees", -1),
                         ("augment.rotation_degrees", 181), ("augment.random_erasing", -0.1),
                         ("augment.random_erasing", 1.01), ("model.embedding_dim", 0),
                         ("model.arcface_margin", -0.1), ("model.arcface_margin", 1.5708), ("model.arcface_scale", 0),
                         ("model.dropout", -0.1), ("model.dropout", 1), ("trainer.max_epochs", 0), ("trainer.lr", 0),
                         ("trainer.weight_decay", -0.1), ("trainer.momentum", -0.1), ("trainer.momentum", 1),
                         ("trainer.warmup_epochs", -1), ("trainer.min_lr_ratio", -0.1), ("trainer.min_lr_ratio", 1.01),
                         ("trainer.label_smoothing", -0.1), ("trainer.label_smoothing", 1),
                         ("trainer.grad_clip_norm", 0), ("trainer.seed", -2**63 - 1), ("trainer.seed", 2**64),
                         ("trainer.checkpoint_interval_s", -1))],
    # A long value is quoted in part: the line stays a line.
    (f"trainer:\n  progress: [{', '.join(['verbose'] * 500)}]\n",
     "'trainer.progress': Input should be 'auto', 'always' or 'never' (got ['verbose', 'verbose', 'verbose', "
     "'verbose', 'verbose', 'verbose', 'verbose',...)"),
])
def test_bad_values_are_refused_in_one_line_naming_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_folder_as_config_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)


def test_what_yaml_writers_use_still_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    # 1e-3 is a string to YAML 1.1 (no dot) and 010 octal; an infinite interval writes only at the
    # end; merge keys may be overridden; booleans where a key takes them.
    path.write_text("trainer:\n  lr: 1e-3\n  max_epochs: 010\n  checkpoint_interval_s: .inf\n  amp: no\n"
                    "model: {<<: {dropout: 0.1, embedding_dim: 64}, dropout: 0.2, pretrained: false}\n")
    config = load_config(path)
    assert config.model.dropout == 0.2 and config.model.embedding_dim == 64
    assert config.trainer.lr == 0.001 and config.trainer.checkpoint_interval_s == float("inf")
    assert config.trainer.max_epochs == 10
    assert config.trainer.amp is False and config.model.pretrained is False


def test_a_config_file_name_that_cannot_name_a_run_is_refused_in_one_line(tmp_path):
    path = tmp_path / "a\tb.yaml"
    path.write_text("trainer: {max_epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"control characters .*: the run is named after the config file"):
        load_config(path)
    (tmp_path / "ok.yaml").write_text('name: "zoo\\u00a0a"\n')  # no control character: a valid name
    assert load_config(tmp_path / "ok.yaml").name == "zoo\u00a0a"


BASELINE = ROOT / "configs" / "train_chimp_min10.yaml"
# Keys the baseline sets to other values than the schema's defaults, and why.
DELIBERATE = {"data.workers",                   # a GPU machine's cores
              "model.pretrained",               # ImageNet weights need a download
              "trainer.warmup_epochs",          # 2 of 50 epochs
              "trainer.checkpoint_interval_s"}  # short GPU epochs


def test_schema_defaults_are_the_baseline_guide_config():
    written = set(flatten(yaml.safe_load(BASELINE.read_text())))
    baseline, defaults = flatten(load_config(BASELINE).to_dict()), flatten(Config().to_dict())
    differing = {key for key in written if baseline[key] != defaults[key]}
    assert differing == DELIBERATE, {key: (baseline[key], defaults[key]) for key in differing ^ DELIBERATE}
