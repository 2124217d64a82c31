"""A teacher from a plain diffusers folder (UNet2DModel + scheduler): its outputs read in this family's
convention match the scheduler's own arithmetic, and our Euler chain is diffusers' scheduler loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from distill.diffusion.diffusers_teacher import load_diffusers_teacher
from distill.diffusion.models import Denoiser
from distill.diffusion.sampling import sample_chain
from distill.errors import InputError


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip


def save(folder: Path, scheduler: object) -> Path:
    tiny_unet().save_pretrained(str(folder / "unet"))
    scheduler.save_pretrained(str(folder / "scheduler"))  # type: ignore[attr-defined]
    return folder


def test_flow_matching_folder_samples_like_the_diffusers_scheduler_loop(tmp_path: Path) -> None:
    folder = save(tmp_path / "flow", FlowMatchEulerDiscreteScheduler())
    net, path = load_diffusers_teacher(folder, "teacher.path")
    den = Denoiser(net, path)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = sample_chain(lambda x, t: den.x0(x, t), path, noise, 4, "ode")
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
        x, unet = noise.clone(), net.model
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_folder_reads_as_the_continuous_vp_path(tmp_path: Path, prediction: str) -> None:
    sched = DDPMScheduler(prediction_type=prediction)
    folder = save(tmp_path / prediction, sched)
    net, path = load_diffusers_teacher(folder, "teacher.path")
    den = Denoiser(net, path)
    k = 600  # a scheduler timestep; our t with the same alpha
    a_bar = sched.alphas_cumprod[k].double()
    t = torch.full((2,), float(torch.acos(a_bar.sqrt()) * 2 / torch.pi))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = net.model(x, torch.full((2,), float(k))).sample
        a, s = a_bar.sqrt().float(), (1 - a_bar).sqrt().float()
        expected = {"epsilon": (x - s * out) / a, "sample": out, "v_prediction": a * x - s * out}[prediction]
        torch.testing.assert_close(den.x0(x, t), expected, atol=2e-3, rtol=2e-3)


def test_unsupported_scheduler_is_one_line(tmp_path: Path) -> None:
    from diffusers import EDMEulerScheduler

    folder = save(tmp_path / "edm", EDMEulerScheduler())
    with pytest.raises(InputError, match="teacher.path: scheduler 'EDMEulerScheduler' is not supported"):
        load_diffusers_teacher(folder, "teacher.path")
