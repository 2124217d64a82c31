"""The feature drafter (EAGLE-style, optional reduced vocabulary): shapes, a weights-only save/load round
trip, training lowers its loss, speculative decoding with it is lossless (chi-square against exact
enumeration, with a broken sampler as the power check) and greedy-identical to the target, and bad input
(a cached or served teacher, a drafter of another target) is one line naming the field."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

# registers the method config before distill.recipe builds its method union (until configs/__init__ does)
import distill.configs.feature_drafter  # noqa: F401
from distill.configs.feature_drafter import FeatureDrafterConfig
from distill.data.batching import collate
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError, RecipeError
from distill.eval.metrics import evaluate
from distill.generation.feature_speculative import TargetView, generate_feature_speculative
from distill.generation.sampling import SamplingSpec
from distill.generation.speculative import generate_plain
from distill.methods.base import Phase, StepContext
from distill.methods.lm.base import LMContext
from distill.methods.lm.feature_drafter import FeatureDrafterKD
from distill.models.feature_drafter import (
    DRAFTER_JSON,
    WEIGHTS,
    build_drafter,
    fingerprint_mismatch,
    frequent_tokens,
    load_drafter,
    save_drafter,
    target_fingerprint,
)
from distill.models.loading import load_model
from distill.recipe import ModelConfig, PruneConfig, parse_recipe
from distill.teachers.live import LiveTeacherSource
from tests.cli.test_errors import assert_one_line_error, run_cli
from tests.conftest import tiny_llama, tiny_recipe
from tests.generation.test_speculative import (
    NEW,
    PROMPT,
    SAMPLES,
    VOCAB,
    check_lossless,
    peaked_llama,
    sequence_counts,
)

GREEDY = SamplingSpec(0.0)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [3]]


def test_shapes_and_frozen_pieces() -> None:
    target = tiny_llama(vocab=64, layers=3, seed=0)
    drafter = build_drafter(target, 64)
    feats, ids = torch.randn(2, 5, 32), torch.randint(0, 64, (2, 5))
    out = drafter(feats, ids)
    assert out.shape == (2, 5, 32) and drafter.logits(out).shape == (2, 5, 64)
    target_params = {p.data_ptr() for p in target.parameters()}
    assert not any(p.data_ptr() in target_params for p in drafter.parameters())  # embeddings/head not owned
    small = build_drafter(target, 64, d2t=torch.tensor([1, 4, 9, 33]))
    assert small.logits(small(feats, ids)).shape == (2, 5, 4)
    assert torch.equal(small.head_weight(), target.lm_head.weight[[1, 4, 9, 33]])


def test_target_view_features_are_the_normed_last_hidden_state() -> None:
    target = tiny_llama(vocab=64, layers=2).eval()
    view, ids = TargetView(target), torch.tensor([[3, 4, 5, 6]])
    logits = view(ids).logits
    assert view.features is not None
    assert torch.allclose(view.features, target.base_model(input_ids=ids).last_hidden_state)
    assert torch.allclose(logits, target.lm_head(view.features))


def test_frequent_tokens() -> None:
    d2t = frequent_tokens([[5, 5, 5, 2, 2, 9], [9, 9, 9, 7]], 3, 12)
    assert d2t.tolist() == [2, 5, 9]  # counts 9:4, 5:3, 2:2; sorted ascending
    assert frequent_tokens([[3]], 3, 12).tolist() == [0, 1, 3]  # unseen ids fill from the lowest
    with pytest.raises(CompatibilityError, match="draft_vocab"):
        frequent_tokens([[3]], 13, 12)


# --- training -----------------------------------------------------------------------------------------


def target_examples(
    target: LlamaForCausalLM,
    vocab: int,
    count: int,
    seed: int,
    extra: list[list[int]] = (),  # type: ignore[assignment]
) -> list[TokenizedExample]:
    """Prompts of random tokens (and `extra` ones) completed greedily by the target itself: the drafter's
    training text. A random target is a chaotic function of its context that a one-layer drafter cannot
    learn from a few hundred tokens, so the greedy tests' prompts are among them (both accept and reject
    paths then occur)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))] for _ in range(count)]
    prompts += [list(p) for p in extra]
    answers = generate_plain(target, prompts, GREEDY, 24).tokens
    return [TokenizedExample(p + a, len(p)) for p, a in zip(prompts, answers, strict=True)]


def train(
    target: LlamaForCausalLM, draft_vocab: int | None, steps: int
) -> tuple[FeatureDrafterKD, list[float]]:
    """A few optimizer steps of the method, as the engine runs them (normaliser = answer tokens)."""
    from distill.models.student import prune_depth

    examples = target_examples(target, 64, 12, seed=1, extra=PROMPTS * 3)
    student, _ = prune_depth(target, PruneConfig(keep_layers=1))
    ctx = LMContext(student=student, teacher=LiveTeacherSource(target, 64), vocab_size=64, chunk_size=64)
    ctx.train = examples  # type: ignore[attr-defined]  # what the family passes (see the report)
    method = FeatureDrafterKD(FeatureDrafterConfig(draft_vocab=draft_vocab), ctx)
    params = [p for m in method.modules().values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        rows = [[(step * 16 + i) % len(examples)] for i in range(16)]
        batch = collate(examples, rows, 0, packing=False)
        units = method.loss_units(batch, Phase())
        assert 0 < units <= batch.num_loss_tokens  # a one-token prompt's first answer token has no feature
        sctx = StepContext(method.modules(), units, Phase(), step, torch.device("cpu"))
        loss, parts = method.loss(sctx, batch)
        assert {"kd", "feature"} <= set(parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    method.drafter.eval()
    return method, losses


@pytest.fixture(scope="module")
def greedy_target() -> LlamaForCausalLM:
    return peaked_llama(64, 3, seed=0, scale=8.0)


@pytest.fixture(scope="module", params=[None, 40], ids=["full-vocab", "draft-vocab-40"])
def trained(
    request: pytest.FixtureRequest, greedy_target: LlamaForCausalLM
) -> tuple[FeatureDrafterKD, list[float]]:
    return train(greedy_target, request.param, steps=60)


def test_training_lowers_the_loss(trained) -> None:
    _, losses = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses


def test_greedy_equals_the_target_token_for_token(trained, greedy_target: LlamaForCausalLM) -> None:
    method, _ = trained
    for adaptive in (False, True):
        batched = generate_feature_speculative(
            greedy_target, method.drafter, PROMPTS, GREEDY, 24, gamma=3, eos_ids={2}, adaptive=adaptive
        )
        alone = [generate_plain(greedy_target, [p], GREEDY, 24, eos_ids={2}).tokens[0] for p in PROMPTS]
        single = [
            generate_feature_speculative(greedy_target, method.drafter, [p], GREEDY, 24, gamma=3, eos_ids={2})
            for p in PROMPTS
        ]
        assert batched.tokens == alone == [s.tokens[0] for s in single]
        assert 0.2 < batched.stats.alpha < 0.98, (
            batched.stats.alpha
        )  # accepted and rejected drafts both occur


def test_teacher_forced_view_scores_in_held_out_evaluation(trained, greedy_target: LlamaForCausalLM) -> None:
    method, _ = trained
    examples = target_examples(greedy_target, 64, 8, seed=7)
    scores = evaluate(
        method.eval_model(), LiveTeacherSource(greedy_target, 64), examples, vocab_size=64, pad_id=0
    )
    assert scores["kl"] >= 0 and 0.2 < scores["top1_agreement"] <= 1.0, scores


def test_save_load_round_trip(tmp_path: Path, trained, greedy_target: LlamaForCausalLM) -> None:
    method, _ = trained
    method.export(tmp_path / "drafter")
    saved = load_file(str(tmp_path / "drafter" / WEIGHTS))  # safetensors: weights only, no pickle
    own = {n for n, p in method.drafter.named_parameters() if p.requires_grad}
    assert set(saved) == own | ({"d2t"} if method.drafter.d2t is not None else set())
    meta = json.loads((tmp_path / "drafter" / DRAFTER_JSON).read_text())
    assert meta["target"]["hidden_size"] == 32 and meta["method"]["name"] == "feature_drafter"
    loaded = load_drafter(tmp_path / "drafter", greedy_target)
    feats, ids = torch.randn(1, 6, 32), torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(
            loaded.logits(loaded(feats, ids)), method.drafter.logits(method.drafter(feats, ids))
        )
    if method.drafter.d2t is not None:
        assert torch.equal(loaded.d2t, method.drafter.d2t)


def test_a_drafter_of_another_target_is_refused(tmp_path: Path) -> None:
    other = tiny_llama(vocab=64, layers=2, hidden=16)
    save_drafter(build_drafter(other, 64), tmp_path / "d", target_fingerprint(other))
    with pytest.raises(CompatibilityError, match="--draft: .*another target: hidden_size"):
        load_drafter(tmp_path / "d", tiny_llama(vocab=64, layers=2))
    same_shape = target_fingerprint(other)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    assert "another checkpoint" in (fingerprint_mismatch(same_shape, target_fingerprint(other)) or "")


# --- losslessness ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_target() -> LlamaForCausalLM:
    return peaked_llama(VOCAB, 2, seed=0, scale=4.0)


@pytest.mark.parametrize(
    ("d2t", "broken"),
    [(None, False), (torch.tensor([0, 1, 3, 4, 6]), False), (None, True)],
    ids=["full-vocab", "draft-vocab-5", "broken-sampler"],
)
def test_sampling_follows_the_target_distribution(small_target, d2t, broken: bool, monkeypatch) -> None:
    def sample() -> dict[tuple[int, ...], int]:
        torch.manual_seed(5)
        drafter = build_drafter(small_target, VOCAB, d2t=d2t).eval()  # untrained: drafts often rejected
        gen = torch.Generator().manual_seed(1234)
        res = generate_feature_speculative(small_target, drafter, [PROMPT] * SAMPLES, SamplingSpec(1.0), NEW,
                                           gamma=2, generator=gen)  # fmt: skip
        return sequence_counts(res, None if broken else (0.1, 0.9))

    check_lossless(sample, small_target, SamplingSpec(1.0), broken, monkeypatch)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cache", "served"])
def test_cached_or_served_teacher_is_one_line(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path, kind
) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", method={"name": "feature_drafter"},
                      baselines=[], student={"init": "prune", "prune": {"keep_layers": 1}})  # fmt: skip
    rec["data"].pop("generate")
    rec["teacher"] = (
        {"kind": "cache", "path": str(tmp_path)}
        if kind == "cache"
        else {"kind": "served", "model": "m", "tokenizer": {"path": str(tiny_teacher_dir)}}
    )
    with pytest.raises(RecipeError) as err:
        parse_recipe(rec)
    assert "teacher.kind" in str(err.value) and "feature_drafter" in str(err.value)
    assert "\n" not in str(err.value)


def test_more_than_one_layer_is_one_line(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", method={"name": "feature_drafter"},
                      baselines=[])  # fmt: skip  # keep_layers: 2
    with pytest.raises(RecipeError, match="student.prune.keep_layers"):
        parse_recipe(rec)


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> tuple[Path, Path]:
    """A drafter for the tiny teacher (reduced vocabulary) and one trained for another target."""
    folder = tmp_path_factory.mktemp("feature_drafters")
    loaded = load_model(ModelConfig(path=str(tiny_teacher_dir)))
    vocab = len(loaded.tokenizer)
    d2t = frequent_tokens([loaded.tokenizer("Question number 3: what is 3 plus 4?")["input_ids"]], 512, vocab)
    fp = target_fingerprint(loaded.model, loaded.tokenizer)
    save_drafter(build_drafter(loaded.model, vocab, d2t=d2t), folder / "mine", fp)
    other = tiny_llama(hidden=16, seed=3)
    save_drafter(build_drafter(other, vocab), folder / "other", target_fingerprint(other, loaded.tokenizer))
    return folder / "mine", folder / "other"


def test_speculate_detects_a_feature_drafter(
    drafter_dirs, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    from distill.generation.speculate_command import report_lines, speculate

    report = speculate(str(tiny_teacher_dir), str(drafter_dirs[0]), str(prompts_file), gamma=3,
                       max_new_tokens=6, limit=2, repeats=1)  # fmt: skip
    assert report["settings"]["draft_kind"] == "feature" and report["settings"]["draft_vocab"] == 512
    assert report["identical_outputs"] == 2 and len(report["alpha_per_position"]) == 3
    assert report["stats"]["draft_step_calls"] > 0 and report["cost_ratio"]["median"] > 0
    assert "feature drafter over 512 draft ids" in report_lines(report)[0]


def test_speculate_refuses_a_drafter_of_another_target(
    drafter_dirs, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    res = run_cli("speculate", "--target", str(tiny_teacher_dir), "--draft", str(drafter_dirs[1]),
                  "--prompts", str(prompts_file))  # fmt: skip
    assert_one_line_error(res, "--draft", "another target")
