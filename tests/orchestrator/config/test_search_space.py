"""Search spaces: parsing, ratios of C, Tune domains, grid expansion, and every invalid space naming its key."""

from __future__ import annotations

import pytest

from orchestrator.config.load import load_config
from orchestrator.config.search_space import (
    SpaceError,
    apply,
    list_spaces,
    load_space,
    parse_space,
    resolved_values,
)
from orchestrator.config.space_checks import validate_space


def _digits():
    return load_config("digits", {"scaling.num_workers": 1})


def _space(params, **top):
    return parse_space({"params": params, **top}, name="t")


def test_presets_parse_and_validate_against_their_configs():
    assert {"digits", "paper_appendix_b"} <= set(list_spaces())
    for name in list_spaces():
        space = load_space(name)
        base = load_config(space.config, space.overrides)
        validate_space(space, base)


def test_paper_appendix_b_is_the_papers_grid_plus_widths():
    space = load_space("paper_appendix_b")
    p = space.params
    assert p["reg.randaug_magnitude"].values == (0, 10, 15, 20)
    assert p["reg.mixup_alpha"].values == (0.0, 0.2, 0.5, 0.8)
    assert p["reg.dropout"].values == (0.0, 0.1) and p["reg.stochastic_depth"].values == (0.0, 0.1)
    assert p["optim.lr"].values == (0.003, 0.001) and p["optim.weight_decay"].values == (0.1, 0.01)
    assert p["model.tokens_mlp_dim"].ratio_of_c and p["model.channels_mlp_dim"].ratio_of_c
    assert space.grid_size("random") == 4 * 4 * 2 * 2 * 2 * 2 == 256
    assert space.grid_size("grid") == 256 * 3 * 3
    assert space.config == "imagenet1k_b16"
    base = load_config(space.config)
    # 3 x 3 widths x 2 dropout x 2 stochastic depth: every model-shaping combination is built once
    assert validate_space(space, base) == 36


def test_ratios_of_c_resolve_to_integer_widths():
    space = load_space("paper_appendix_b")
    base = load_config("imagenet1k_b16")  # Mixer-B/16: C = 768
    cfg = apply(base, {"model.tokens_mlp_dim": 0.5, "model.channels_mlp_dim": 4, "reg.mixup_alpha": 0.2}, space)
    assert (cfg.model.tokens_mlp_dim, cfg.model.channels_mlp_dim) == (384, 3072)  # Table 1's B/16
    assert cfg.reg.mixup_alpha == 0.2
    assert resolved_values(cfg, ["model.tokens_mlp_dim"]) == {"model.tokens_mlp_dim": 384}
    # C itself searched: the ratio follows the trial's C
    s2 = _space({"model.hidden_dim": {"grid": [32, 64]}, "model.tokens_mlp_dim": {"choice": [0.5], "ratio_of": "C"}})
    cfg = apply(_digits(), {"model.hidden_dim": 64, "model.tokens_mlp_dim": 0.5}, s2)
    assert (cfg.model.hidden_dim, cfg.model.tokens_mlp_dim) == (64, 32)
    # rounding to the nearest integer
    cfg = apply(_digits(), {"model.hidden_dim": 30, "model.tokens_mlp_dim": 0.5}, s2)
    assert cfg.model.tokens_mlp_dim == 15


def test_tune_domains_per_search_algorithm():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    space = _space({
        "model.tokens_mlp_dim": {"grid": [0.25, 1.0], "ratio_of": "C"},
        "reg.mixup_alpha": {"choice": [0.0, 0.5]},
        "optim.lr": {"loguniform": ["1e-4", "1e-2"]},  # YAML 1.1 reads 1e-4 as a string: accepted as a number
        "reg.randaug_magnitude": {"randint": [0, 20]},
        "reg.dropout": {"uniform": [0, 0.1]},
    })
    rnd = space.to_tune("random")
    assert rnd["model.tokens_mlp_dim"] == tune.grid_search([0.25, 1.0])
    assert isinstance(rnd["reg.mixup_alpha"], Categorical)
    assert isinstance(rnd["optim.lr"], Float) and (rnd["optim.lr"].lower, rnd["optim.lr"].upper) == (1e-4, 1e-2)
    assert "LogUniform" in type(rnd["optim.lr"].sampler).__name__
    assert isinstance(rnd["reg.randaug_magnitude"], Integer) and rnd["reg.randaug_magnitude"].upper == 21  # inclusive
    opt = space.to_tune("optuna")  # Optuna has no grid: grids become categorical
    assert isinstance(opt["model.tokens_mlp_dim"], Categorical)
    with pytest.raises(SpaceError, match="optim.lr"):
        space.to_tune("grid")  # a range cannot be grid-searched


def test_grid_expansion():
    space = _space({
        "model.tokens_mlp_dim": {"grid": [0.25, 0.5, 1.0], "ratio_of": "C"},
        "model.channels_mlp_dim": {"grid": [2, 4], "ratio_of": "C"},
        "reg.mixup_alpha": {"choice": [0.0, 0.5]},
    })
    assert space.grid_size("random") == 6 and space.grid_size("grid") == 12
    # grid_size is what Tune's own expansion of the param space generates (num_samples=1)
    from ray.tune.search.variant_generator import generate_variants

    points = [spec for _, spec in generate_variants(space.to_tune("random"))]
    widths = {(p["model.tokens_mlp_dim"], p["model.channels_mlp_dim"]) for p in points}
    assert len(points) == 6 and len(widths) == 6
    assert all(p["reg.mixup_alpha"] in (0.0, 0.5) for p in points)  # the choice is sampled, not crossed
    assert len(list(generate_variants(space.to_tune("grid")))) == 12
    grid = space.to_tune("grid")
    assert grid["reg.mixup_alpha"] == {"grid_search": [0.0, 0.5]}


def test_round_trip_through_dict():
    space = load_space("digits")
    again = parse_space(space.to_dict(), name=space.name)
    assert again.params == space.params and again.overrides == space.overrides


def test_yaml_file_and_unknown_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("params:\n  optim.lr: {choice: [0.001, 0.003]}\n")
    assert load_space(str(f)).name == "mine"
    with pytest.raises(SpaceError, match="digits"):
        load_space("no_such_space")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(bad))


@pytest.mark.parametrize(
    "tree, names",
    [
        ({"params": {"reg.mixupp_alpha": {"choice": [0.1]}}}, ["reg.mixupp_alpha", "mixup_alpha"]),
        ({"params": {"regs.mixup_alpha": {"choice": [0.1]}}}, ["regs.mixup_alpha", "reg"]),
        ({"params": {"mixup_alpha": {"choice": [0.1]}}}, ["mixup_alpha", "section.key"]),
        ({"params": {"reg.mixup_alpha": {"choice": []}}}, ["reg.mixup_alpha", "empty"]),
        ({"params": {"reg.mixup_alpha": {"grid": []}}}, ["reg.mixup_alpha", "empty"]),
        ({"params": {"optim.lr": {"uniform": [0.01, 0.001]}}}, ["optim.lr", "low 0.01 > high 0.001"]),
        ({"params": {"optim.lr": {"loguniform": [0, 0.1]}}}, ["optim.lr", "low > 0"]),
        ({"params": {"optim.lr": {"uniform": [0.1]}}}, ["optim.lr", "[low, high]"]),
        ({"params": {"reg.randaug_magnitude": {"randint": [0, 2.5]}}}, ["reg.randaug_magnitude", "integers"]),
        ({"params": {"reg.randaug_magnitude": {"randint": [20, 0]}}}, ["reg.randaug_magnitude", "low 20 > high 0"]),
        ({"params": {"optim.lr": {"normal": [0, 1]}}}, ["optim.lr", "normal", "choice"]),
        ({"params": {"optim.lr": {"choice": [0.1], "grid": [0.2]}}}, ["optim.lr", "exactly one"]),
        ({"params": {"optim.lr": 0.1}}, ["optim.lr", "overrides"]),
        ({"params": {"optim.lr": {"choice": [0.1], "ratio_of": "C"}}}, ["optim.lr", "ratio_of"]),
        ({"params": {"model.tokens_mlp_dim": {"choice": [0.5], "ratio_of": "D"}}}, ["model.tokens_mlp_dim", "ratio_of"]),
        ({"params": {"model.tokens_mlp_dim": {"choice": [0, 0.5], "ratio_of": "C"}}}, ["model.tokens_mlp_dim", "positive"]),
        ({"params": {"run.name": {"choice": ["a", "b"]}}}, ["run.name", "cannot be searched"]),
        ({"params": {"tracking.parent_run_id": {"choice": ["a"]}}}, ["tracking.parent_run_id", "cannot be searched"]),
        ({"params": {}}, ["params"]),
        ({"parameters": {"optim.lr": {"choice": [0.1]}}}, ["parameters", "top level"]),
        ({"params": {"optim.lr": {"choice": [0.1]}}, "num_samples": 0}, ["num_samples", "0"]),
        ({"params": {"optim.lr": {"choice": [0.1]}}, "overrides": {"optim.lrr": 1}}, ["optim.lrr"]),
        ({"params": {"optim.lr": {"choice": [0.1]}}, "overrides": {"optim.lr": 1}}, ["optim.lr", "both"]),
    ],
)
def test_invalid_space_names_the_key(tree, names):
    with pytest.raises(SpaceError) as e:
        parse_space(tree, name="t")
    for name in names:
        assert name in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "params, names",
    [
        # a value the config refuses
        ({"reg.dropout": {"choice": [0.0, 1.5]}}, ["reg.dropout", "1.5", "[0, 1)"]),
        ({"optim.lr": {"uniform": [-0.1, 0.1]}}, ["optim.lr", "-0.1", "positive"]),
        ({"reg.randaug_magnitude": {"uniform": [0, 10]}}, ["reg.randaug_magnitude", "integer"]),
        ({"schedule.decay": {"choice": ["linear", "step"]}}, ["schedule.decay", "step"]),
        ({"model.name": {"choice": ["mixer_digits", "mixer_x99"]}}, ["model.name", "mixer_x99"]),
        # a width no model can have
        ({"model.tokens_mlp_dim": {"choice": [0.001], "ratio_of": "C"}}, ["model.tokens_mlp_dim", "0.001", "C="]),
        ({"model.patch_size": {"choice": [5]}}, ["model.patch_size", "5"]),
        # each value fine alone, a combination no model can build
        ({"model.img_size": {"grid": [16, 12]}, "model.patch_size": {"grid": [4, 8]}},
         ["model.img_size", "model.patch_size", "model.img_size=12", "model.patch_size=8", "no model"]),
        # a batch that does not divide over the searched worker counts
        ({"scaling.num_workers": {"choice": [1, 3]}, "optim.global_batch_size": {"choice": [128, 96]}},
         ["scaling.num_workers", "optim.global_batch_size"]),
    ],
)
def test_invalid_values_and_combinations_name_the_key(params, names):
    space = _space(params)
    with pytest.raises(SpaceError) as e:
        validate_space(space, _digits())
    for name in names:
        assert name in str(e.value), str(e.value)


def test_points_are_one_grid_axis_of_labelled_values_taken_together():
    """`points:` (what orchestrator.study builds its grids from): each a label and values set together, crossed
    with the grids, validated per point and in combination, expanded when a trial's config is made."""
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.config.search_space import POINT_KEY
    from orchestrator.config.space_checks import PLAN_KEYS, candidate_configs

    space = parse_space({
        "points": {"small": {"model.hidden_dim": 32, "model.depth": 2, "schedule.epochs": 3},
                   "large": {"model.hidden_dim": 64, "model.depth": 4, "schedule.epochs": 6}},
        "params": {"model.tokens_mlp_dim": {"grid": [8, 16]}},
    }, name="ladder")
    assert space.grid_size("grid") == 4 and space.tune_keys() == ["model.tokens_mlp_dim", POINT_KEY]
    assert space.value_keys() == ["model.tokens_mlp_dim", "model.hidden_dim", "model.depth", "schedule.epochs"]
    variants = [spec for _, spec in generate_variants(space.to_tune("grid"))]
    assert sorted((v[POINT_KEY], v["model.tokens_mlp_dim"]) for v in variants) == [
        ("large", 8), ("large", 16), ("small", 8), ("small", 16)]
    cfg = apply(_digits(), {POINT_KEY: "large", "model.tokens_mlp_dim": 16}, space)
    assert (cfg.model.hidden_dim, cfg.model.depth, cfg.schedule.epochs, cfg.model.tokens_mlp_dim) == (64, 4, 6, 16)
    assert resolved_values(cfg, space.value_keys())["model.depth"] == 4
    assert validate_space(space, _digits()) == 4  # every (point, D_S) combination built
    assert sorted(c.schedule.epochs for c in candidate_configs(space, _digits(), PLAN_KEYS)) == [3, 6]
    again = parse_space(space.to_dict(), name="ladder")  # what --resume reads back
    assert again.points == space.points and again.params == space.params
    with pytest.raises(SpaceError, match="'huge'.*small, large"):
        apply(_digits(), {POINT_KEY: "huge"}, space)


@pytest.mark.parametrize(
    "tree, names",
    [
        ({"points": {"a": {"model.hidden_dimm": 3}}}, ["points.a.model.hidden_dimm", "hidden_dim"]),
        ({"points": {"a": {"run.name": "x"}}}, ["'a'", "run.name"]),
        ({"points": {"a": 3}}, ["'a'", "mapping"]),
        ({"points": []}, ["points=[]"]),
        ({"points": {"a": {"optim.lr": 0.1}}, "overrides": {"optim.lr": 0.2}}, ["optim.lr", "'a'", "fixed"]),
    ],
)
def test_bad_points_name_the_point_and_key(tree, names):
    with pytest.raises(SpaceError) as e:
        parse_space(tree)
    for name in names:
        assert name in str(e.value), str(e.value)


def test_a_point_no_model_can_be_built_for_is_named():
    space = parse_space({"points": {"odd": {"model.img_size": 12, "model.patch_size": 8}}})
    with pytest.raises(SpaceError, match="point 'odd'.*model.img_size=12"):
        validate_space(space, _digits())


def test_the_minival_fraction_cannot_be_searched():
    with pytest.raises(SpaceError, match="data.minival_fraction cannot be searched: it decides the held-out split"):
        _space({"data.minival_fraction": {"choice": [0.05, 0.1]}})
