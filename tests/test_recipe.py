import pytest

from distill.errors import RecipeError
from distill.recipe import apply_override, builtin_recipes, load_recipe, parse_recipe


def base() -> dict:
    return {
        "teacher": {"kind": "live", "model": {"path": "x"}},
        "student": {"init": "prune", "prune": {"keep_layers": 2}},
        "data": {"train": {"path": "t.jsonl"}, "generate": {}},
        "method": {"name": "logit_kd"},
    }


def test_builtin_quickstart_validates() -> None:
    assert "quickstart" in builtin_recipes()
    r = load_recipe("quickstart")
    assert r.method.name == "logit_kd" and [b.name for b in r.baselines] == ["seq_kd"]


def test_defaults_in_code() -> None:
    r = parse_recipe(base())
    assert r.train.steps == 100 and r.method.divergence == "forward_kl"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(bogus=1), "bogus"),
        (lambda d: d["train"].update(stepz=3) if "train" in d else d.update(train={"stepz": 3}), "train.stepz"),
        (lambda d: d.update(train={"steps": "many"}), "train.steps"),
        (lambda d: d["method"].update(divergence="kl2"), "method.logit_kd.divergence"),
        (lambda d: d["method"].update(name="nope"), "method"),
        (lambda d: d.pop("student"), "student"),
        (lambda d: d["student"].update(prune={"keep_layers": 2, "layers": [1]}), "student.prune"),
    ],
)
def test_bad_recipe_names_the_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    d = base()
    mutate(d)
    with pytest.raises(RecipeError) as err:
        parse_recipe(d)
    msg = str(err.value)
    assert f"'{field}" in msg and "\n" not in msg


def test_capability_checks() -> None:
    d = base()
    d.pop("teacher")
    with pytest.raises(RecipeError, match="needs a teacher"):
        parse_recipe(d)
    d = base()
    d["baselines"] = [{"name": "seq_kd"}]
    d["data"].pop("generate")
    with pytest.raises(RecipeError, match="data.generate"):
        parse_recipe(d)


def test_overrides() -> None:
    r = parse_recipe(base(), ["train.steps=7", "method.divergence=jsd", "method.beta=0.3", "data.packing=true"])
    assert r.train.steps == 7 and r.method.divergence == "jsd" and r.method.beta == 0.3  # type: ignore[union-attr]
    assert r.data.packing is True
    d = {"a": [{"b": 1}]}
    apply_override(d, "a.0.b=2")
    assert d == {"a": [{"b": 2}]}
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_recipe(base(), ["train.steps"])


def test_yaml_is_data_not_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(p))
