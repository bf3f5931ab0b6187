"""Config: every built-in recipe resolves; typos and wrong types fail naming the field and the nearest name."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from deeprecipe import config
from deeprecipe.config import ConfigError
from deeprecipe.data import DATASETS
from deeprecipe.models import MODELS
from deeprecipe.recipe import load, resolve


@pytest.mark.parametrize("recipe", sorted(config.list_recipes()))
def test_builtin_recipe_resolves(recipe):
    desc = config.list_recipes()[recipe]
    assert desc and "\n" not in desc, f"recipe {recipe} needs a one-line description"
    cfg = load(recipe)
    assert cfg.recipe == recipe
    assert dataclasses.is_dataclass(cfg.data) and dataclasses.is_dataclass(cfg.model)
    # the saved form resolves back to the same config (what resume and eval rely on)
    again = resolve(yaml.safe_load(config.dump(cfg)))
    assert config.to_dict(again) == config.to_dict(cfg)


def test_default_recipe_names_exist():
    assert {"digits-cnn", "fashion-mnist-cnn", "fashion-mnist-resnet"} <= set(config.list_recipes())


@pytest.mark.parametrize("registry,section", [(DATASETS, "data"), (MODELS, "model")])
def test_registry_defaults_pass_their_own_type_checks(registry, section):
    for name, cls in registry.items():
        obj = cls()
        assert obj.name == name, f"{cls.__name__}.name default should be the registry key '{name}'"
        assert config.from_dict(cls, config.to_dict(obj), section) == obj


def test_yaml_path_recipe(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("description: mine\ndata: {name: digits}\nmodel: {name: mlp, hidden: [8]}\ntrain: {steps: 7}\n")
    cfg = load(str(p))
    assert (cfg.recipe, cfg.model.hidden, cfg.train.steps) == ("mine", (8,), 7)


def test_set_overrides_any_field():
    cfg = load(
        "digits-cnn",
        [
            "optim.lr=1e-4",
            "train.steps=5",
            "model.channels=[4, 8]",
            "data.flip=true",
            "train.device=cpu",
            "optim.betas=[0.8, 0.9]",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 5
    assert cfg.model.channels == (4, 8)
    assert cfg.data.flip is True
    assert cfg.optim.betas == (0.8, 0.9)


def test_set_switches_model_and_data_class():
    cfg = load("digits-cnn", ["model.name=resnet", "model.layout=resnet8"])
    assert type(cfg.model) is MODELS["resnet"] and cfg.model.layout == "resnet8"
    assert load("digits-cnn", ["model.name=cnn"]).model.dense == (64,)  # same name: the recipe's keys stay


@pytest.mark.parametrize("order", [1, -1])
def test_a_name_override_applies_before_its_sections_other_keys_in_any_order(order):
    sets = ["data.path=/some/boxes", "data.name=boxfiles", "model.width=8", "model.name=resnet", "model.dropout=0.1"]
    raw = config.apply_overrides(config.read_recipe("digits-cnn")[0], sets[::order])
    assert raw["data"] == {"name": "boxfiles", "path": "/some/boxes"}  # the recipe's digits keys are gone
    assert raw["model"] == {"name": "resnet", "width": 8, "dropout": 0.1}
    cfg = load("digits-cnn", sets[::order])
    assert (cfg.data.path, cfg.model.width, cfg.model.dropout) == ("/some/boxes", 8, 0.1)


@pytest.mark.parametrize(
    "override,expect",
    [
        ("optim.lrr=1", "did you mean 'lr'"),
        ("train.step=3", "did you mean 'steps'"),
        ("model.chanels=[4]", "did you mean 'channels'"),
        ("data.crop_padd=2", "did you mean 'crop_pad'"),
        ("optimm.lr=1", "did you mean 'optim'"),
    ],
)
def test_unknown_key_suggests_nearest(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load("digits-cnn", [override])


@pytest.mark.parametrize("override,key", [("optim.lrr=1", "optim.lrr"), ("optimm.lr=1", "optimm")])
def test_unknown_key_reads_as_typed(override, key):
    with pytest.raises(ConfigError) as e:
        load("digits-cnn", [override])
    assert str(e.value).startswith(f"unknown key '{key}':")  # no 'config.' in front


def test_wrong_type_message_names_the_key_as_typed():
    with pytest.raises(ConfigError) as e:
        load("digits-cnn", ["train.steps=abc"])
    assert str(e.value).startswith("train.steps: expected an integer")


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("optim.lr=fast", "optim.lr"),
        ("data.flip=maybe", "data.flip"),
        ("model.channels=7", "model.channels"),
        ("model.channels=[a]", "model.channels[0]"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("train.compile=1", "train.compile"),
    ],
)
def test_wrong_type_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load("digits-cnn", [override])
    assert field in str(e.value)


@pytest.mark.parametrize(
    "override,expect",
    [
        ("model.name=resnett", "did you mean 'resnet'"),
        ("model.name=mpl", "did you mean 'mlp'"),
        ("data.name=fashion-mnst", "did you mean 'fashion-mnist'"),
        ("data.name=digit", "did you mean 'digits'"),
        ("data.name=5", "data.name"),
        ("data=5", "'data' must be a mapping"),
        ("model=[1]", "'model' must be a mapping"),
    ],
)
def test_unknown_names_suggest_nearest(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load("digits-cnn", [override])


def test_unknown_recipe_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'digits-cnn'"):
        load("digits-cnnn")


@pytest.mark.parametrize(
    "override",
    [
        "train.accum=0",
        "train.batch_size=0",
        "train.steps=0",
        "train.accum=3",
        "train.ckpt_every=0",
        "train.log_every=0",
        "train.nonfinite=ignore",
        "train.ema=1.5",
        "train.eval_every=-1",
    ],
)
def test_train_values_out_of_range_fail_early(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load("digits-cnn", [override])


@pytest.mark.parametrize(
    "recipe, override, says",
    [
        ("digits-cnn", "optim.lr=-1", "optim.lr=-1.0: must be > 0"),
        ("digits-cnn", "optim.lr=0", "optim.lr=0.0: must be > 0"),
        ("digits-cnn", "optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
        ("digits-cnn", "optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: each value must be in [0, 1)"),
        ("digits-cnn", "optim.label_smoothing=1", "optim.label_smoothing=1.0: must be in [0, 1)"),
        ("digits-cnn", "model.dropout=1.0", "model.dropout=1.0: must be in [0, 1)"),
        ("digits-cnn", "data.val_fraction=1.5", "data.val_fraction=1.5: must be in [0, 1)"),
        ("digits-cnn", "model.channels=[32,0]", "model.channels=[32, 0]: each value must be > 0"),
        ("moving-digits-c3d", "data.frames=0", "data.frames=0: must be > 0"),
        ("scenes-unet", "data.size=[0,64]", "data.size=[0, 64]: each value must be > 0"),
        ("shakespeare-char-gpt", "model.n_head=0", "model.n_head=0: must be > 0"),
        ("digits-cnn", "finetune.head_lr=-1", "finetune.head_lr=-1.0: must be >= 0"),
    ],
)
def test_values_out_of_range_fail_at_config_time(recipe, override, says):
    """A value outside its range (declared beside the field, config.ranged) is a one-line ConfigError naming the
    field, not a torch error."""
    with pytest.raises(ConfigError) as e:
        load(recipe, [override])
    assert str(e.value) == says and "\n" not in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load("digits-cnn", ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load("digits-cnn", ["optim.lr.x=1"])


def test_a_recipes_cuda_section_applies_on_cuda_only_and_a_set_still_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "task: classify\ndata: {name: digits}\nmodel: {name: cnn}\ntrain: {steps: 100, batch_size: 32}\n"
        "cuda: {train.batch_size: 256, train.steps: 20, optim.lr: 0.01}\n"
    )
    cpu = load(str(recipe), ["train.device=cpu"])
    assert (cpu.train.batch_size, cpu.train.steps, cpu.optim.lr) == (32, 100, config.OptimConfig().lr)
    with pytest.warns(UserWarning, match="cuda section sets train.batch_size=256, optim.lr=0.01"):
        gpu = load(str(recipe), ["train.device=cuda", "train.steps=50"])
    assert (gpu.train.batch_size, gpu.train.steps, gpu.optim.lr) == (256, 50, 0.01)
    again = resolve(yaml.safe_load(config.dump(gpu)))  # config.yaml holds the values used
    assert again.train.batch_size == 256
    recipe.write_text("task: classify\ncuda: [train.steps]\n")
    with pytest.raises(ConfigError, match="'cuda' must map config paths to values"):
        load(str(recipe), ["train.device=cuda"])


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.schedule=cosin", "optim.schedule=cosin: did you mean 'cosine'? (one of cosine, onecycle, constant)"),
        ("train.nonfinite=ignore", "train.nonfinite=ignore: use one of stop, skip"),
        ("train.steps=0", "train.steps=0: must be >= 1"),
        ("train.ema=1.5", "train.ema=1.5: must be in [0, 1)"),
    ],
)
def test_choices_and_ranges_declared_beside_the_field_fail_in_one_line(override, says):
    with pytest.raises(ConfigError) as e:
        load("digits-cnn", [override])
    assert str(e.value) == says


def test_any_dataclass_with_a_ranged_field_is_checked_where_it_is_read():
    """The range lives beside the field (config.ranged), so a data set's or model's config class declares its own."""

    @dataclasses.dataclass
    class Mine:
        width: int = config.ranged(8, "> 0")
        rates: tuple[float, float] = config.ranged((0.1, 0.2), "[0, 1)")

    assert config.from_dict(Mine, {"width": 3}, "model").width == 3
    with pytest.raises(ConfigError, match=r"^model.width=0: must be > 0$"):
        config.from_dict(Mine, {"width": 0}, "model")
    with pytest.raises(ConfigError, match=r"^model.rates=\[0.5, 1.0\]: each value must be in \[0, 1\)$"):
        config.from_dict(Mine, {"rates": [0.5, 1]}, "model")


# Field names whose ranges once lived in a table in config.py, one rule per name for any data set or model: every
# numeric field of a registered class with one of these names now declares its range beside it (or its choices).
FORMERLY_TABLED = {
    "data": {"val_fraction", "test_fraction", "image_size", "crop_pad", "limit", "per_class", "size", "scale"}
    | {"frames", "stride", "eval_clips", "block_size", "max_len", "train_size", "val_size", "test_size", "noise"},
    "model": {"dropout", "attn_dropout", "real_label", "dice", "d_lr_scale", "length_penalty", "beam", "latent"}
    | {"hidden", "channels", "dense", "width", "blocks", "depth", "stages", "n_layer", "n_head", "n_embd", "d_model"},
}
SECTIONS = [("data", name, cls) for name, cls in DATASETS.items()] + [("model", n, c) for n, c in MODELS.items()]


def _leaves(tp) -> set:
    """The plain types inside an annotation: tuple[int, ...] -> {int}, float | None -> {float, NoneType}."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return {type(a) for a in args}
    return set().union(*map(_leaves, args)) if args else {tp}


def _out_of_range(rule: str, kind: type):
    """The value just outside `rule` below it: the bound itself when it is excluded, else one less."""
    lo = float(rule.lstrip(">=[( ").split(",")[0])
    excluded = rule.startswith("(") or (rule.startswith(">") and not rule.startswith(">="))
    value = lo if excluded else lo - 1
    return int(value) if kind is int else value


def _ranged_fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "range" in f.metadata]


def _choice_fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is typing.Literal]


@pytest.mark.parametrize("section, name, cls", SECTIONS, ids=[f"{s}.{n}" for s, n, _ in SECTIONS])
def test_every_numeric_field_once_in_the_table_declares_its_range_beside_it(section, name, cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        numeric = _leaves(hints[f.name]) & {int, float}
        if f.name in FORMERLY_TABLED[section] and numeric:
            literal = typing.get_origin(hints[f.name]) is typing.Literal
            assert "range" in f.metadata or literal, f"{cls.__name__}.{f.name}: declare it with config.ranged"


@pytest.mark.parametrize("section, name, cls", SECTIONS, ids=[f"{s}.{n}" for s, n, _ in SECTIONS])
def test_a_data_or_model_value_outside_its_range_is_one_line_naming_the_key_and_the_rule(section, name, cls):
    for f, tp in _ranged_fields(cls):
        rule = f.metadata["range"]
        default = getattr(cls(), f.name)
        if isinstance(default, (list, tuple)):  # one item out of range: the rule holds for each
            kind = type(default[0])
            bad = [*default[:-1], _out_of_range(rule, kind)]
        else:
            kind = int if int in _leaves(tp) else float
            bad = _out_of_range(rule, kind)
        with pytest.raises(ConfigError) as e:
            config.from_dict(cls, {"name": name, f.name: bad}, section)
        said = str(e.value)
        assert said.startswith(f"{section}.{f.name}=") and said.endswith(rule) and "\n" not in said, said
        config.from_dict(cls, {"name": name, f.name: default}, section)  # the default lies inside


@pytest.mark.parametrize("section, name, cls", SECTIONS, ids=[f"{s}.{n}" for s, n, _ in SECTIONS])
def test_a_wrong_choice_of_a_data_or_model_field_names_the_nearest_one(section, name, cls):
    for f, tp in _choice_fields(cls):
        choices = typing.get_args(tp)
        shown = ", ".join(str(c) if c != "" else '""' for c in choices)
        for c in choices:
            if isinstance(c, str) and c:
                with pytest.raises(ConfigError) as e:
                    config.from_dict(cls, {"name": name, f.name: c + "x"}, section)
                assert str(e.value) == f"{section}.{f.name}={c}x: did you mean '{c}'? (one of {shown})"
        if all(isinstance(c, int) for c in choices):
            with pytest.raises(ConfigError) as e:
                config.from_dict(cls, {"name": name, f.name: max(choices) + 1}, section)
            assert str(e.value) == f"{section}.{f.name}={max(choices) + 1}: use one of {shown}"


@pytest.mark.parametrize(
    "recipe, override, says",
    [
        ("scenes-detect", "model.backbone=resnt", "did you mean 'resnet'? (one of resnet, cnn, tv-resnet18)"),
        ("scenes-inpaint", "data.holes=stroke", "did you mean 'strokes'? (one of box, strokes, both)"),
        ("scenes-sr4", "data.scale=5", "use one of 2, 3, 4, 8"),
        ("shakespeare-char-gpt", "model.size=big", 'use one of "", tiny, mini, small, medium, gpt2-124M'),
        ("fashion-mnist-resnet", "model.layout=resnet50", "did you mean 'resnet20'?"),
    ],
)
def test_recipes_refuse_a_wrong_choice_before_anything_is_built(recipe, override, says):
    with pytest.raises(ConfigError) as e:
        load(recipe, [override])
    assert str(e.value).startswith(f"{override}: {says}")


def test_the_named_sizes_and_layouts_are_the_choices_of_their_fields():
    from deeprecipe.models.gpt import SIZES, GPTConfig
    from deeprecipe.models.resnet import LAYOUTS, ResNetConfig

    assert typing.get_args(typing.get_type_hints(GPTConfig)["size"]) == ("", *SIZES)
    assert typing.get_args(typing.get_type_hints(ResNetConfig)["layout"]) == tuple(LAYOUTS)
