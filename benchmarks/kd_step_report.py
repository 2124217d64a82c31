"""kd_step benchmark: the summary table (figure, median (min-max), target, PASS/FAIL)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from kd_step_data import Pair
from kd_step_measure import LoopRun, Spread, ratio
from kd_step_memory import TARGET_MEMORY_KINDS, MemoryRises
from kd_step_steps import StepTimes


@dataclass
class Row:
    figure: str
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "FAIL")


def print_table(title: str, rows: list[Row]) -> None:
    w1 = max(len(r.figure) for r in rows)
    w2 = max(len(r.value) for r in rows)
    print(f"\n{title}")
    print(f"  {'figure':<{w1}}  {'median (min-max)':<{w2}}  {'target':<8}  result")
    for r in rows:
        print(f"  {r.figure:<{w1}}  {r.value:<{w2}}  {r.target:<8}  {r.verdict}")


def step_rows(times: StepTimes) -> list[Row]:
    wall, cpu = times.wall, times.cpu
    rows = [
        Row("step s: logit_kd forward KL", Spread(wall["kd_forward_kl"]).fmt(unit="s")),
        Row("step s: logit_kd JSD(0.5)", Spread(wall["kd_jsd"]).fmt(unit="s")),
        Row("step s: (a) distill CE + LiveTeacherSource fwd", Spread(wall["ce_teacher"]).fmt(unit="s")),
        Row("step s: (b) HF CE(labels) + HF teacher fwd", Spread(wall["hf_ce_teacher"]).fmt(unit="s")),
    ]
    for kind, label, target in (("kd_forward_kl", "fwd-KL", 1.05), ("kd_jsd", "JSD", 1.10)):
        r = ratio(wall[kind], wall["ce_teacher"])
        rows.append(Row(f"KD {label} / (a) strict", r.fmt(3), f"<= {target:.2f}", r.median <= target))
        rows.append(Row("  same, by process CPU time", ratio(cpu[kind], cpu["ce_teacher"]).fmt(3)))
    for kind, label in (("kd_forward_kl", "fwd-KL"), ("kd_jsd", "JSD")):
        rows.append(Row(f"KD {label} / (b) conventional", ratio(wall[kind], wall["hf_ce_teacher"]).fmt(3)))
    return rows


def memory_rows(pair: Pair, mem: MemoryRises) -> list[Row]:
    if "ce_teacher" not in mem:
        return []
    n = min(len(v) for k, v in mem.items() if k in TARGET_MEMORY_KINDS)
    base = [float(x) for x in mem["ce_teacher"][:n]]
    # The rise includes the gradients and AdamW's two moments (3 x the student's parameter bytes), which
    # every variant allocates alike; without them the transient part (activations, logits chunks) remains.
    state = 3 * sum(q.numel() * q.element_size() for q in pair.student.parameters())
    rows = []
    for k, label in (("kd_forward_kl", "fwd KL"), ("kd_jsd", "JSD")):
        if k not in mem:
            continue
        r = ratio([float(x) for x in mem[k][:n]], base)
        rows.append(Row(f"mem rise KD {label} / (a) CE+teacher", r.fmt(3), "<= 1.25", r.median <= 1.25))
        if min(base) > state:
            rows.append(
                Row(
                    "  same, minus grads+AdamW state",
                    ratio([x - state for x in mem[k][:n]], [x - state for x in base]).fmt(3),
                )
            )
    rows += [Row(f"mem rise MiB: {k}", Spread([x / 2**20 for x in v]).fmt(0)) for k, v in mem.items()]
    if "trl" in mem and "kd_forward_kl" in mem:
        trl = statistics.median(mem["trl"]) / statistics.median(mem["kd_forward_kl"])
        rows.append(Row("mem rise TRL GKD / distill KD fwd KL", f"{trl:.2f}"))
    return rows


def loop_rows(loops: dict[str, list[LoopRun]], trl_skipped: str | None) -> list[Row]:
    def padding(runs: list[LoopRun]) -> str:
        return f"{1 - sum(r.real_tokens for r in runs) / sum(r.slots for r in runs):.1%}"

    d, n = loops["distill"], loops["distill_no_prefix"]
    rows = [
        Row("distill loop real tok/s (fwd KL)", Spread([r.tokens_per_s for r in d]).fmt(0)),
        Row("distill loop s/step | padding", f"{Spread([r.step_s for r in d]).fmt(unit='s')} | {padding(d)}"),
        Row("  same without the teacher prefix cache", Spread([r.tokens_per_s for r in n]).fmt(0)),
        Row(
            "  prefix cache speed-up", ratio([r.tokens_per_s for r in d], [r.tokens_per_s for r in n]).fmt(2)
        ),
    ]
    if "trl" not in loops:
        return rows + [Row("TRL GKD", f"not run: {trl_skipped}")]
    t = loops["trl"]
    speedup = ratio([r.tokens_per_s for r in d], [r.tokens_per_s for r in t])
    rows += [
        Row("TRL GKD (beta=0: fwd KL) real tok/s", Spread([r.tokens_per_s for r in t]).fmt(0)),
        Row("TRL GKD s/step | padding", f"{Spread([r.step_s for r in t]).fmt(unit='s')} | {padding(t)}"),
        Row("distill tok/s / TRL tok/s", speedup.fmt(2), ">= 2.5", speedup.median >= 2.5),
        Row(
            "  same, distill without the prefix cache",
            ratio([r.tokens_per_s for r in n], [r.tokens_per_s for r in t]).fmt(2),
        ),
        Row(
            "  same, by process CPU time",
            ratio([r.tokens_per_cpu_s for r in d], [r.tokens_per_cpu_s for r in t]).fmt(2),
        ),
    ]
    return rows


def summary_rows(
    pair: Pair, times: StepTimes, loops: dict[str, list[LoopRun]], mem: MemoryRises, trl_skipped: str | None
) -> list[Row]:
    return step_rows(times) + loop_rows(loops, trl_skipped) + memory_rows(pair, mem)
