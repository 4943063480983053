import pytest
import yaml

from vlseg.config import DEFAULTS, apply_overrides, load_config, save_config
from vlseg.errors import VlsegError
from vlseg.registry import FUSIONS, IMAGE_ENCODERS, LOSSES, TEXT_ENCODERS, Registry


def test_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run_name: exp\ntrain:\n  steps: 7\nfusion:\n  layers: 3\n")
    cfg = load_config(path, ["train.lr=1e-3", "data.crop_size=[16, 16, 8]", "fusion.self_attention=false"])
    assert cfg["run_name"] == "exp" and cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 0.001
    assert cfg["data"]["crop_size"] == [16, 16, 8]
    assert cfg["fusion"]["layers"] == 3 and cfg["fusion"]["self_attention"] is False
    assert cfg["train"]["batch_size"] == DEFAULTS["train"]["batch_size"]  # untouched defaults survive
    assert DEFAULTS["train"]["steps"] != 7  # defaults are never mutated
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(saved.read_text()) == cfg


def test_choosing_another_component_drops_the_old_ones_arguments():
    cfg = apply_overrides(DEFAULTS, ["text_encoder.dim=16", "text_encoder.name=onehot"])
    assert cfg["text_encoder"] == {"name": "onehot", "dim": 16}


@pytest.mark.parametrize("bad", ["train.stepz=3", "nosuch.key=1", "noequals", "=3", "train.lr.x=1"])
def test_bad_overrides_are_one_line_errors(bad):
    with pytest.raises(VlsegError) as err:
        apply_overrides(DEFAULTS, [bad])
    assert bad in str(err.value) and "\n" not in str(err.value)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(VlsegError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(VlsegError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_registries_hold_every_swappable_part():
    import vlseg.models.network  # noqa: F401  (registers the components)

    assert {"hf", "clip", "onehot"} <= set(TEXT_ENCODERS.names())
    assert "unet3d" in IMAGE_ENCODERS.names()
    assert {"query_decoder", "dynamic_head", "dodnet"} <= set(FUSIONS.names())
    assert {"masked", "naive"} <= set(LOSSES.names())
    with pytest.raises(VlsegError, match="unknown fusion 'nope'; available: dodnet, dynamic_head, query_decoder"):
        FUSIONS.get("nope")
    # A setting the chosen component does not take is a one-line error, not a TypeError from its constructor.
    with pytest.raises(VlsegError, match="text encoder 'onehot': got an unexpected keyword argument 'path'"):
        TEXT_ENCODERS.build({"name": "onehot", "path": "x"}, vocabulary=None)
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError):
        reg.register("a")(float)
