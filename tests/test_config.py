"""YAML composition and command-line overrides."""

import pytest

from magic3d.config import ConfigError, apply_overrides, deep_merge, load_composed, parse_override


def test_deep_merge_merges_nested_and_replaces_on_new_class_path():
    base = {"model": {"scene": {"class_path": "a.A", "init_args": {"x": 1, "y": 2}}, "lr": 0.1}}
    same_class = deep_merge(base, {"model": {"scene": {"class_path": "a.A", "init_args": {"y": 3}}}})
    assert same_class["model"]["scene"]["init_args"] == {"x": 1, "y": 3}
    assert same_class["model"]["lr"] == 0.1
    other_class = deep_merge(base, {"model": {"scene": {"class_path": "b.B", "init_args": {"z": 0}}}})
    assert other_class["model"]["scene"] == {"class_path": "b.B", "init_args": {"z": 0}}
    assert base["model"]["scene"]["init_args"] == {"x": 1, "y": 2}, "inputs must not be mutated"


def test_override_values_are_yaml_and_init_args_may_be_omitted():
    config = {"trainer": {"max_steps": 10}, "model": {"scene": {"class_path": "a.A", "init_args": {}}}}
    out = apply_overrides(config, ["trainer.max_steps=500", "model.scene.radius=1.5",
                                   "model.scene.init_args.name=abc", "model.lr_overrides={background: 0.1}"])
    assert out["trainer"]["max_steps"] == 500
    assert out["model"]["scene"]["init_args"] == {"radius": 1.5, "name": "abc"}
    assert out["model"]["lr_overrides"] == {"background": 0.1}


@pytest.mark.parametrize("bad", ["trainer.max_steps", "=3", "a..b=1"])
def test_malformed_overrides_are_rejected(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_extends_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGIC3D_RECIPES", str(tmp_path))
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "base.yaml").write_text("a: 1\nb: {c: 2, d: 3}\n")
    (tmp_path / "stage.yaml").write_text("extends: [parts/base.yaml]\nb: {d: 4}\n")
    assert load_composed(tmp_path / "stage.yaml") == {"a": 1, "b": {"c": 2, "d": 4}}


def test_circular_extends_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGIC3D_RECIPES", str(tmp_path))
    (tmp_path / "x.yaml").write_text("extends: [y.yaml]\n")
    (tmp_path / "y.yaml").write_text("extends: [x.yaml]\n")
    with pytest.raises(ConfigError, match="Circular"):
        load_composed(tmp_path / "x.yaml")
