"""AdaSPEC's token selection for `drafter` (Hu et al. 2025): with a reference drafter, the tokens kept are
those with the largest loss gap L_drafter - L_reference, against a mask computed by hand from the three
models' full forwards; the reference loads frozen from a folder, and a reference that reads other
tokens, or no folder, is one line naming `reference`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distill.configs.on_policy import DrafterConfig
from distill.configs.teachers import ModelConfig
from distill.data.batching import IGNORE
from distill.errors import CompatibilityError, InputError
from distill.methods.lm.on_policy import DrafterKD
from tests.engine.test_accumulation import V, lm_ctx
from tests.generation.test_engine import lively_llama
from tests.on_policy.test_on_policy import _batch, _ctx, _models

DROP = 0.25


def _save(model: torch.nn.Module, folder: Path, tokenizer_dir: Path, extra_token: bool = False) -> Path:
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if extra_token:
        tok.add_tokens(["<not-in-the-target-vocabulary>"])
    tok.save_pretrained(folder)
    return folder


def _tvd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logits.softmax(-1) - target.softmax(-1)).abs().sum(-1)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer_dir: Path) -> Path:
    return _save(lively_llama(seed=21, vocab=V).double(), tmp_path_factory.mktemp("ref"), smol_tokenizer_dir)


def test_kept_tokens_are_the_largest_loss_gaps(reference_dir: Path) -> None:
    student, teacher = _models()
    cfg = DrafterConfig(selective=DROP, reference=ModelConfig(path=str(reference_dir), dtype="float64"))
    method = DrafterKD(cfg, lm_ctx(student, teacher, chunk_size=4))
    reference = method.reference
    assert reference is not None and method.frozen_modules()["reference"] is reference
    assert not any(p.requires_grad for p in reference.parameters())
    batch = _batch()
    rows = method.student_rows(_ctx({"student": method.body}, batch), batch)
    keep, kept = method._select_tokens(rows, teacher.signal(batch, rows.select), DROP, batch)

    select = batch.targets != IGNORE
    inputs = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    with torch.no_grad():
        s, t, r = (m(**inputs).logits[select][:, :V] for m in (student, teacher.model, reference))
    gap = (_tvd(s, t) - _tvd(r, t)).tolist()
    n = len(gap)
    by_gap = sorted(range(n), key=lambda i: -gap[i])
    want = sorted(by_gap[: n - int(DROP * n)])
    assert keep.tolist() == want and kept.num_rows == len(want)
    assert min(gap[i] for i in want) > max(gap[i] for i in set(range(n)) - set(want))
    own = sorted(sorted(range(n), key=lambda i: float(_tvd(s[i], t[i])))[: n - int(DROP * n)])
    assert own != want  # the reference changes which tokens are kept: the test tells the rules apart
    torch.testing.assert_close(kept.logits(0, len(want)), t[want].float(), rtol=0, atol=1e-9)
    loss, parts = method.loss(_ctx({"student": method.body}, batch), batch)
    assert loss.requires_grad and parts["kept_fraction"] == len(want) / n


def test_reference_must_read_the_targets_tokens(tmp_path: Path, smol_tokenizer_dir: Path) -> None:
    student, teacher = _models()
    ctx = lm_ctx(student, teacher)
    ctx.tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    other = _save(lively_llama(seed=22, vocab=V), tmp_path / "other", smol_tokenizer_dir, extra_token=True)
    cfg = DrafterConfig(selective=DROP, reference=ModelConfig(path=str(other)))
    with pytest.raises(CompatibilityError, match="^reference: its tokenizer differs") as err:
        DrafterKD(cfg, ctx)
    assert "\n" not in str(err.value)
    missing = DrafterConfig(selective=DROP, reference=ModelConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(InputError, match="^reference: model folder not found"):
        DrafterKD(missing, ctx)


def test_a_reference_without_selection_is_refused() -> None:
    class _Recipe:
        teacher, data = None, None

    with pytest.raises(ValueError, match="^reference: it only ranks tokens"):
        DrafterConfig(reference=ModelConfig(path="x")).check(_Recipe())  # type: ignore[arg-type]
