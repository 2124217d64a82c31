"""Two processes (DDP over gloo, CPU) give the same gradient as one process over the same batches.

The ranks meet through a file store, not a TCP port picked in advance: a port freed and then taken by
another process before rank 0 binds it can leave the ranks waiting on each other. The join is bounded
too, so a stuck rendezvous fails this test instead of hanging the suite.
"""

import gc
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distill.data.batching import collate
from distill.engine.trainer import accumulate_gradients
from distill.methods.lm.logit_kd import LogitKD
from distill.recipe import LogitKDConfig
from distill.teachers.live import LiveTeacherSource
from tests.conftest import tiny_llama
from tests.engine.test_accumulation import V, _examples, lm_ctx

GROUPS = {0: [[0, 1], [2]], 1: [[3, 4, 5]]}  # uneven token counts per process on purpose


def _worker(rank: int, world: int, store: str, out: str) -> None:
    # Accelerate insists on MASTER_ADDR/PORT, though the process group below never dials them.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    )
    from accelerate import Accelerator

    torch.set_num_threads(1)
    # Accelerate keeps a process group that already exists, so the file-store rendezvous is ours.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    acc = Accelerator(cpu=True)
    teacher = LiveTeacherSource(tiny_llama(vocab=V, layers=3, dtype=torch.float64, seed=2), V)
    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=1)
    method = LogitKD(LogitKDConfig(divergence="jsd", ce_weight=0.3), lm_ctx(student, teacher, chunk_size=4))
    wrapped = {name: acc.prepare(m) for name, m in method.modules().items()}
    exs = _examples()
    micro = [collate(exs, [[i] for i in g], pad_id=0, packing=False) for g in GROUPS[rank]]
    accumulate_gradients(acc, method, wrapped, micro)
    if rank == 0:
        lm = student
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        torch.save(grads, out)
    acc.wait_for_everyone()
    # The DDP wrappers go before their process group: freed after it, a reducer could hang in teardown.
    del wrapped, method, acc
    gc.collect()
    torch.distributed.destroy_process_group()


def _run_two(store: Path, out: Path, limit_s: float = 300.0) -> None:
    ctx = mp.start_processes(
        _worker, args=(2, str(store), str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=2):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the two ranks did not finish within {limit_s:.0f} s")


def test_two_processes_equal_one(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    _run_two(tmp_path / "store", out)
    multi = torch.load(out, weights_only=True)

    from accelerate import Accelerator

    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=1)
    teacher = LiveTeacherSource(tiny_llama(vocab=V, layers=3, dtype=torch.float64, seed=2), V)
    method = LogitKD(LogitKDConfig(divergence="jsd", ce_weight=0.3), lm_ctx(student, teacher, chunk_size=4))
    exs = _examples()
    micro = [collate(exs, [[i] for i in range(6)], pad_id=0, packing=False)]
    accumulate_gradients(Accelerator(cpu=True), method, method.modules(), micro)
    single = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert single.keys() == multi.keys()
    for name in single:
        torch.testing.assert_close(multi[name], single[name], atol=1e-6, rtol=0)
