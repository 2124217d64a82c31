import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.errors import RecipeError
from distill.models.loading import save_student
from distill.models.student import evenly_spaced_layers, prune_depth
from distill.recipe import PruneConfig
from tests.conftest import tiny_llama


def test_evenly_spaced_keeps_ends() -> None:
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(RecipeError, match="keep_layers"):
        evenly_spaced_layers(4, 5)


def test_prune_copies_the_kept_layers_and_ends() -> None:
    teacher = tiny_llama(vocab=100, layers=6)
    student, keep = prune_depth(teacher, PruneConfig(layers=[5, 0, 3]))
    assert keep == [0, 3, 5] and student.config.num_hidden_layers == 3
    for j, i in enumerate(keep):
        assert torch.equal(
            student.model.layers[j].self_attn.q_proj.weight, teacher.model.layers[i].self_attn.q_proj.weight
        )
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    # the copy is independent of the teacher
    student.model.norm.weight.data.add_(1)
    assert not torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    with pytest.raises(RecipeError, match="out of range"):
        prune_depth(teacher, PruneConfig(layers=[0, 9]))


def test_all_layers_kept_is_the_teacher() -> None:
    teacher = tiny_llama(vocab=100, layers=3)
    student, _ = prune_depth(teacher, PruneConfig(keep_layers=3))
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(student(x).logits, teacher(x).logits)


def test_saved_student_loads_with_from_pretrained(tmp_path, smol_tokenizer_dir) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    student, _ = prune_depth(tiny_llama(), PruneConfig(keep_layers=2))
    save_student(student, tok, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert loaded_tok.chat_template and len(loaded_tok) == len(tok)
    x = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        assert torch.allclose(again(x).logits, student(x).logits)
    assert not list(tmp_path.glob(".student.*")), "no temp folder left behind"
