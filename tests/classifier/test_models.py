from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.classifier.models import (
    ARCHITECTURES,
    MLP,
    ResNetish,
    SmallCNN,
    TinyViT,
    build_model,
    find_module,
    model_config,
    model_from_config,
    module_names,
)

TINY = {
    "mlp": {"hidden": [16, 8]},
    "cnn": {"width": 4},
    "resnet": {"width": 4, "blocks": [1, 2, 1]},
    "vit": {"dim": 16, "depth": 2, "heads": 2},
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_backward_shapes(arch: str, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, (channels, 8, 8), 5, TINY[arch])
    x = torch.randn(3, channels, 8, 8)
    logits = model(x)
    assert logits.shape == (3, 5)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mlp_takes_flat_inputs() -> None:
    model = build_model("mlp", (12,), 3, {})
    assert model(torch.randn(2, 12)).shape == (2, 3)
    assert model_config(model)["in_shape"] == [12]


def test_non_square_images() -> None:
    for arch in ("cnn", "resnet", "vit"):
        model = build_model(arch, (1, 8, 4), 2, TINY[arch])
        assert model(torch.randn(2, 1, 8, 4)).shape == (2, 2)


def test_hookable_names() -> None:
    names = set(module_names(build_model("mlp", (1, 8, 8), 3, {})))
    assert {"layers.0", "layers.1", "head"} <= names
    names = set(module_names(SmallCNN(1, 3, width=4, image_size=8)))
    assert {"stem", "block1", "block2", "pool", "head"} <= names
    names = set(module_names(ResNetish(3, 3, width=4)))
    assert {"stem", "layer1", "layer2", "layer3", "pool", "head"} <= names
    vit = TinyViT(1, 3, image_size=8, dim=16, depth=2, heads=2)
    assert {"blocks.0.attn", "blocks.1.mlp", "norm", "head"} <= set(module_names(vit))
    assert "" not in module_names(vit)


def test_resnet_downsamples_at_stages_2_and_3() -> None:
    model = ResNetish(1, 3, width=4)
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        find_module(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, o.shape)
        )
    model(torch.randn(1, 1, 8, 8))
    assert shapes == {"layer1": (1, 4, 8, 8), "layer2": (1, 8, 4, 4), "layer3": (1, 16, 2, 2)}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_rebuild_from_exported_config(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(arch, (3, 8, 8), 4, TINY[arch])
    model(torch.randn(8, 3, 8, 8))  # move BatchNorm running stats off their defaults
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model_config(model)))

    torch.manual_seed(2)
    rebuilt = model_from_config(json.loads((tmp_path / "config.json").read_text()))
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    rebuilt.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert model_config(rebuilt) == model_config(model)


def test_directly_built_models_record_config() -> None:
    cfg = model_config(MLP(64, 10, hidden=(8,), dropout=0.1))
    assert cfg == {"arch": "mlp", "in_shape": [64], "classes": 10, "options": {"hidden": [8], "dropout": 0.1}}
    assert model_config(TinyViT(3, 2, image_size=4, dim=8, heads=2, depth=1))["in_shape"] == [3, 4, 4]
    with pytest.raises(ValueError, match="not built by the classifier zoo"):
        model_config(torch.nn.Linear(2, 2))


def _one_line_error(*args: object) -> str:
    with pytest.raises(ValueError) as info:
        build_model(*args)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_build_model_errors_are_one_line() -> None:
    assert _one_line_error("x", (1, 8, 8), 3, {}).startswith(
        "unknown architecture 'x' (known: cnn, mlp, resnet, vit"
    )
    assert (
        _one_line_error("mlp", (1, 8, 8), 3, {"y": 1})
        == "unknown option 'y' for mlp (known: dropout, hidden)"
    )
    assert "image_size" not in _one_line_error("cnn", (1, 8, 8), 3, {"image_size": 4}).split("known:")[1]
    assert "(C, H, W)" in _one_line_error("resnet", (64,), 3, {})
    assert "not divisible by patch" in _one_line_error("vit", (1, 8, 8), 3, {"patch": 3})
    assert "not divisible by heads" in _one_line_error("vit", (1, 8, 8), 3, {"dim": 10, "heads": 4})
    assert "blocks" in _one_line_error("resnet", (1, 8, 8), 3, {"blocks": [1, 1]})


def test_timm_path() -> None:
    try:
        import timm  # noqa: F401
    except Exception:
        message = _one_line_error("timm:resnet18", (3, 8, 8), 4, {})
        assert "timm" in message and ("not installed" in message or "does not import" in message)
        return
    model = build_model("timm:resnet18", (3, 32, 32), 4, {})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model_config(model)["arch"] == "timm:resnet18"


def test_timm_broken_import_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.classifier.models as models

    def broken(name: str) -> object:
        raise RuntimeError("operator torchvision::nms does not exist\nlong traceback text")

    monkeypatch.setattr(models.importlib, "import_module", broken)
    message = _one_line_error("timm:resnet18", (3, 8, 8), 4, {})
    assert "does not import" in message and "torchvision::nms" in message


def test_find_module_lists_nearest_names() -> None:
    model = ResNetish(1, 3, width=4)
    assert find_module(model, "layer2.0.conv1") is model.layer2[0].conv1
    with pytest.raises(ValueError) as info:
        find_module(model, "layer9", role="student")
    message = str(info.value)
    assert message.startswith("module 'layer9' not found in the student (nearest: ")
    nearest = message.split("nearest: ")[1].rstrip(")").split(", ")
    assert {"layer1", "layer2", "layer3"} <= set(nearest) and len(nearest) <= 5
    vit = TinyViT(1, 3, image_size=8, dim=16, depth=2, heads=2)
    with pytest.raises(ValueError, match=r"nearest: .*blocks\.1\.attn"):
        find_module(vit, "blocks.7.attn")
    with pytest.raises(ValueError, match="nearest: "):
        find_module(vit, "qqqqqqqqqq")
