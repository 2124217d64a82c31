"""`distill sample` on tiny model folders saved the way the family saves them: the samples are the
sampler's output from the seed's noise (same seed, same samples), every output kind is written, and bad
options give one line naming the option, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.diffusion.models import Denoiser, DigitsUNet, ToyMLP, guided_x0
from distill.diffusion.paths import NoisePath
from distill.diffusion.sample_command import load_model_folder, sample_folder
from distill.diffusion.sampling import generate
from distill.methods.diffusion.base import NOISE_PATH_FILE, save_denoiser
from tests.cli.test_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("toy") / "model"
    den = Denoiser(ToyMLP(hidden=32, layers=1), NoisePath("flow"))
    save_denoiser(den, folder, {"sampler": "ode", "steps": 3, "classes": 0, "shape": [2]})
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("digits") / "student"
    den = Denoiser(DigitsUNet(width=8, classes=10), NoisePath("vp"))
    save_denoiser(den, folder, {"sampler": "consistency", "steps": 2, "classes": 10, "shape": [1, 8, 8]})
    return folder


def test_saves_the_samplers_output_from_the_seeds_noise(toy: Path, tmp_path: Path) -> None:
    message = sample_folder(toy, tmp_path / "a.npy", count=5, seed=3)
    assert "5 samples" in message and "ode, 3 steps" in message
    got = np.load(tmp_path / "a.npy")
    assert got.shape == (5, 2)
    model = load_model_folder(toy)
    den = model.denoiser
    want = generate(lambda x, t, lab: den.x0(x, t, lab), den.path, (2,), 5, 3, "ode", seed=3)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=0)
    sample_folder(toy, tmp_path / "b.npy", count=5, seed=3)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), got)
    sample_folder(toy, tmp_path / "c.npy", count=5, seed=4)
    assert not np.allclose(np.load(tmp_path / "c.npy"), got)
    sample_folder(toy, tmp_path / "d.npy", count=5, seed=3, steps=1, sampler="heun")
    assert not np.allclose(np.load(tmp_path / "d.npy"), got)


def test_conditional_images_with_label_and_guidance(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    message = sample_folder(digits, out, count=4, label=7, guidance=2.0, seed=1)
    assert "class 7" in message and "guidance 2" in message and "consistency, 2 steps" in message
    saved = load_file(str(out))
    assert saved["samples"].shape == (4, 1, 8, 8) and saved["labels"].tolist() == [7] * 4
    den = load_model_folder(digits).denoiser
    want = generate(lambda x, t, lab: guided_x0(den, x, t, lab, 2.0), den.path, (1, 8, 8), 4, 2,
                    "consistency", seed=1, labels=torch.full((4,), 7))  # fmt: skip
    torch.testing.assert_close(saved["samples"], want, rtol=0, atol=0)


def test_image_folder_and_scatter(digits: Path, toy: Path, tmp_path: Path) -> None:
    sample_folder(digits, tmp_path / "imgs", count=3, steps=1)
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert names == ["00000_label0.png", "00001_label1.png", "00002_label2.png"]  # classes in turn
    assert plt.imread(tmp_path / "imgs" / names[0]).shape[:2] == (8, 8)
    sample_folder(toy, tmp_path / "ring.png", count=50)
    assert plt.imread(tmp_path / "ring.png").ndim == 3


def test_guidance_distilled_student_reads_the_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "student"
    net = ToyMLP(hidden=32, layers=1, classes=3, guidance_embed=True)
    torch.nn.init.normal_(net.cond.guidance[2].weight)  # a trained guidance embedding
    save_denoiser(Denoiser(net, NoisePath("flow")), folder, {"sampler": "ode", "steps": 2, "classes": 3,
                                                              "shape": [2]})  # fmt: skip
    (folder / "method.json").write_text('{"name": "cfg_distill", "eval_scale": 3.0}')
    assert load_model_folder(folder).guidance_input
    sample_folder(folder, tmp_path / "default.npy", count=6)  # the scale it was evaluated at
    sample_folder(folder, tmp_path / "three.npy", count=6, guidance=3.0)
    sample_folder(folder, tmp_path / "one.npy", count=6, guidance=1.0)
    np.testing.assert_array_equal(np.load(tmp_path / "default.npy"), np.load(tmp_path / "three.npy"))
    assert not np.allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "three.npy"))


def in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """The CLI's entry point run in this process (a subprocess per error case costs seconds of imports)."""
    from distill import cli

    monkeypatch.setattr(sys, "argv", ["distill", *args])
    monkeypatch.setattr(cli, "_configure_libraries", lambda: None)
    code = 0
    try:
        cli.main()
    except SystemExit as err:
        code = int(err.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_cli_writes_samples(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npy"
    res = run_cli("sample", str(toy), "--count", "7", "--steps", "2", "--seed", "5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote 7 samples" in res.stdout
    assert np.load(out).shape == (7, 2)


@pytest.mark.parametrize(
    ("which", "args", "needles"),
    [
        ("toy", ["--steps", "0"], ["--steps:", "at least 1"]),
        ("toy", ["--count", "0"], ["--count:"]),
        ("digits", ["--label", "12"], ["--label: 12 is out of range for a model with 10 classes"]),
        ("toy", ["--label", "1"], ["--label:", "unconditional"]),
        ("toy", ["--guidance", "2"], ["--guidance:", "unconditional"]),
        ("toy", ["--sampler", "euler"], ["--sampler:", "'euler'"]),
        ("digits", [], ["--out:", ".png", "folder"]),  # images to a scatter file
    ],
)
def test_bad_options_give_one_line(
    which: str, args: list[str], needles: list[str], toy: Path, digits: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    folder = toy if which == "toy" else digits
    res = in_process(monkeypatch, capsys, "sample", str(folder), *args, "--out", str(tmp_path / "o.png"))
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "o.png").exists()


def test_folder_without_noise_path(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((toy / "config.json").read_text())
    res = in_process(monkeypatch, capsys, "sample", str(tmp_path / "bare"), "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(res, str(tmp_path / "bare"), NOISE_PATH_FILE)
    res = in_process(monkeypatch, capsys, "sample", str(tmp_path / "nope"), "--out", str(tmp_path / "o.npy"))
    assert_one_line_error(res, "nope", "not a folder")
