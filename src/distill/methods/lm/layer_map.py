"""Which student block is matched to which teacher block, and the per-block modules a representation
loss reads (block outputs; attention query / key / value projections)."""

from __future__ import annotations

import math

from torch import nn

from distill.errors import RecipeError
from distill.models.student import evenly_spaced_layers


def layer_pairs(
    spec: str | int | list[tuple[int, int]],
    n_student: int,
    n_teacher: int,
    origin: list[int] | None,
    field: str,
) -> list[tuple[int, int]]:
    """[(student block, teacher block)] from `all`, `last`, an evenly spaced count or explicit pairs. A
    student block pruned from the teacher pairs with the block it was copied from; otherwise with the
    teacher block at the same relative depth."""
    if isinstance(spec, list):
        pairs = [(int(s), int(t)) for s, t in spec]
        for s, t in pairs:
            if s >= n_student:
                raise RecipeError(
                    f"{field}: student layer {s} does not exist (the student has {n_student} blocks, 0-{n_student - 1})"
                )
            if t >= n_teacher:
                raise RecipeError(
                    f"{field}: teacher layer {t} does not exist (the teacher has {n_teacher} blocks, 0-{n_teacher - 1})"
                )
        return pairs
    if spec == "all":
        students = list(range(n_student))
    elif spec == "last":
        students = [n_student - 1]
    else:
        assert isinstance(spec, int)
        if spec > n_student:
            raise RecipeError(f"{field}: {spec} layers asked, the student has {n_student} blocks")
        students = evenly_spaced_layers(n_student, spec)
    if origin is not None and len(origin) == n_student:
        return [(s, origin[s]) for s in students]
    return [(s, max(0, round((s + 1) * n_teacher / n_student) - 1)) for s in students]


def attention_parts(block: nn.Module, who: str) -> dict[str, nn.Module]:
    """The query, key and value projections of a decoder block's self-attention."""
    attn = getattr(block, "self_attn", None)
    parts = {k: getattr(attn, f"{k[0]}_proj", None) for k in ("query", "key", "value")}
    if any(not isinstance(m, nn.Module) for m in parts.values()):
        raise RecipeError(f"{who}: relations need self_attn.q_proj / k_proj / v_proj in every block")
    return {k: m for k, m in parts.items() if m is not None}


def relation_heads(asked: int | None, widths: list[int], field: str) -> int:
    """Relation heads dividing every related width: as asked, else gcd(widths) / 64 (heads of >= 64
    channels, MiniLMv2's scale) and at least one."""
    common = math.gcd(*widths)
    heads = asked if asked is not None else max(1, common // 64)
    bad = [w for w in widths if w % heads]
    if bad:
        raise RecipeError(
            f"{field}: {heads} relation heads do not divide the related widths {sorted(set(widths))}"
        )
    return heads
