#!/usr/bin/env python
"""Size and fidelity of the offline top-k teacher cache on the quickstart data.

    python benchmarks/cache.py [--k 64] [--prompts 64] [--value-step 0.02] [--steps 0.0015 0.005 0.04]

Takes ~2 min on 2 busy CPU cores once the answers exist (+ ~10 min the first time, for generation).

Teacher: SmolLM2-135M-Instruct (the quickstart's GGUF, de-quantised to fp32). Data: the quickstart's
training answers (`runs/quickstart/data/train.jsonl`) if present, else the teacher answers `--prompts`
quickstart prompts (spread over the file; saved under runs/benchmarks/ and reused). Answers are tokenised
as the pipeline does (chat template, max_length 256).

1. `write_cache` runs the live teacher over the answers at k = `--k`, T = 1: cache time, bytes per cached
   token (whole shard files), and the exact top-k (float32 log_softmax, captured from the same logits).
2. The reader (`CachedTeacherSource.signal`) serves every answer token through the pipeline's batching
   (batch 8, length-grouped), timed: tokens/s of decoding.
3. Fidelity over all answer tokens, p_exact = exact top-k renormalised, p_dec = decoded top-k
   renormalised (same ids):
     (a) |KL(p_exact || q) - KL(p_dec || q)| for the student q = the quickstart's 6-layer pruned copy
         of the teacher, untrained (q's full-vocabulary log-probs at the top-k ids);
     (a') the same with q = the teacher itself at T=2 (KL ~1.2 nats: a stand-in for a trained student);
     (b) KL(p_exact || p_dec), the error of the decoded distribution itself.
   Targets: bytes/token <= 100, mean (a) <= 1e-3 nats, mean (b) <= 1e-3 nats.
4. The same captured top-k re-encoded with other value steps (`--steps`): bytes/token and (a), (b).

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.data.batching import IGNORE, Batch, collate, plan_batches
from distill.data.generate import generate_completions
from distill.data.records import Example, read_examples, write_jsonl_atomic
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.models.loading import load_model, tokenizer_fingerprint
from distill.models.student import prune_depth
from distill.recipe import load_recipe
from distill.teachers.base import SparseTeacherSignal, TeacherSignal, TeacherSource
from distill.teachers.cache import DEFAULT_VALUE_STEP, CachedTeacherSource, example_key, write_cache
from distill.teachers.live import LiveTeacher

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def teacher_answers(recipe, teacher, tok, n_prompts: int) -> tuple[list[Example], str]:  # type: ignore[no-untyped-def]
    rel = recipe.run_dir() / "data" / "train.jsonl"
    for cached in (rel, ROOT / rel):
        if cached.exists():
            return read_examples(str(cached)), f"{cached} (the quickstart's training answers)"
    own = ROOT / "runs" / "benchmarks" / f"cache_answers_{n_prompts}.jsonl"  # runs/ is git-ignored
    if own.exists():
        return read_examples(str(own)), f"{own} (this benchmark's earlier teacher answers)"
    prompts = read_examples(recipe.data.train.path)
    step = max(1, len(prompts) // n_prompts)
    prompts = prompts[::step][:n_prompts]  # spread over the file's categories
    assert recipe.data.generate is not None
    log(
        f"{rel} not found: the teacher answers {len(prompts)} prompts ({recipe.data.generate.max_new_tokens} new tokens)"
    )
    out = generate_completions(
        teacher, tok, prompts, recipe.data.generate, system_prompt=recipe.data.system_prompt, seed=recipe.seed
    )
    rows = [
        {
            "messages": [*ex.prompt, {"role": "assistant", "content": ex.completion or ""}],
            "finished": ex.finished,
        }
        for ex in out
    ]
    own.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(own, rows)
    return out, f"{len(out)} quickstart prompts answered by the teacher now (saved to {own})"


class Capturing(TeacherSource):
    """Wraps the live teacher; records the exact top-k (as the cache writer computes it) per example."""

    def __init__(self, inner: LiveTeacher, k: int) -> None:
        self.inner, self.k = inner, k
        self.exact: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.near: dict[str, torch.Tensor] = {}  # teacher at T=2 at the top-k ids: a stand-in trained student

    def signal(self, batch: Batch, select: torch.Tensor) -> TeacherSignal:
        sig = self.inner.signal(batch, select)
        assert isinstance(sig, TeacherSignal)
        logits = sig.logits(0, sig.num_rows)
        lp, ids = torch.log_softmax(logits.float(), -1).topk(self.k, -1)
        near = torch.log_softmax(logits.float() / 2.0, -1).gather(-1, ids)
        at = 0
        for b in range(batch.input_ids.shape[0]):  # the writer's batches: one example per row, right-padded
            n = int(select[b].sum())
            if n:
                real = (
                    int(batch.attention_mask[b].sum())
                    if batch.attention_mask is not None
                    else batch.input_ids.shape[1]
                )
                key = example_key(batch.input_ids[b, :real])
                self.exact[key] = (ids[at : at + n], lp[at : at + n])
                self.near[key] = near[at : at + n]
            at += n
        return TeacherSignal(
            logits=lambda s, e: logits[s:e], num_rows=sig.num_rows, vocab_size=sig.vocab_size
        )


class Replay(TeacherSource):
    """A sparse source serving the captured exact top-k (to re-encode without re-running the teacher)."""

    def __init__(self, exact: dict[str, tuple[torch.Tensor, torch.Tensor]], vocab: int) -> None:
        self.exact, self.vocab = exact, vocab

    def signal(self, batch: Batch, select: torch.Tensor) -> SparseTeacherSignal:
        ids, lps = [], []
        for b in range(batch.input_ids.shape[0]):
            if int(select[b].sum()):
                real = (
                    int(batch.attention_mask[b].sum())
                    if batch.attention_mask is not None
                    else batch.input_ids.shape[1]
                )
                i, lp = self.exact[example_key(batch.input_ids[b, :real])]
                ids.append(i)
                lps.append(lp)
        return SparseTeacherSignal(
            ids=torch.cat(ids), logprobs=torch.cat(lps), temperature=1.0, vocab_size=self.vocab
        )


@torch.no_grad()
def student_logq(
    student: torch.nn.Module, examples: list[TokenizedExample], exact: dict, vocab: int
) -> dict[str, torch.Tensor]:
    """The student's full-vocabulary log-probs at each example's exact top-k ids."""
    out: dict[str, torch.Tensor] = {}
    for s in range(0, len(examples), 8):
        chunk = examples[s : s + 8]
        batch = collate(chunk, [[i] for i in range(len(chunk))], 0, packing=False)
        logits = student(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        for b, ex in enumerate(chunk):
            key = example_key(ex.input_ids)
            if key in out or key not in exact:
                continue
            rows = logits[b, ex.prompt_len - 1 : len(ex.input_ids) - 1, :vocab].float()
            out[key] = torch.log_softmax(rows, -1).gather(-1, exact[key][0])
    return out


def served_rows(
    src: CachedTeacherSource, examples: list[TokenizedExample], batch_size: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """Every answer token through the pipeline's batching; (per-example rows, seconds in signal(), tokens)."""
    plan = plan_batches(
        [len(e.input_ids) for e in examples], batch_size, seed=0, epoch=0, group_by_length=True
    )
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seconds, tokens = 0.0, 0
    for rows in plan:
        batch = collate(examples, rows, 0, packing=False)
        select = batch.targets != IGNORE
        t0 = time.perf_counter()
        sig = src.signal(batch, select)
        seconds += time.perf_counter() - t0
        tokens += sig.num_rows
        at = 0
        for row in rows:
            ex = examples[row[0]]
            n = ex.num_loss_tokens
            got[example_key(ex.input_ids)] = (sig.ids[at : at + n], sig.logprobs[at : at + n])
            at += n
    return got, seconds, tokens


def kl_to(lp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per row KL(renormalised top-k || q) with q's log-probs at the same ids."""
    pe = torch.log_softmax(lp.double(), -1)
    return (pe.exp() * (pe - logq.double())).sum(-1)


def fidelity(exact: dict, decoded: dict, logq: dict) -> dict[str, np.ndarray]:
    ea, eb = [], []
    for key, (ids, lp) in exact.items():
        d_ids, d_lp = decoded[key]
        oe, od = ids.sort(-1), d_ids.sort(-1)
        if not torch.equal(oe.values, od.values):
            raise AssertionError("decoded top-k ids differ from the exact ones")
        pe = torch.log_softmax(lp.double().gather(-1, oe.indices), -1)
        pd = torch.log_softmax(d_lp.double().gather(-1, od.indices), -1)
        q = logq[key].double().gather(-1, oe.indices)
        kl_e = (pe.exp() * (pe - q)).sum(-1)
        kl_d = (pd.exp() * (pd - q)).sum(-1)
        ea.append((kl_e - kl_d).abs())
        eb.append((pe.exp() * (pe - pd)).sum(-1))
    return {"vs_student": torch.cat(ea).numpy(), "self": torch.cat(eb).numpy()}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=64)
    p.add_argument(
        "--prompts", type=int, default=64, help="prompts to answer when no quickstart answers exist"
    )
    p.add_argument("--value-step", type=float, default=DEFAULT_VALUE_STEP, help="the cache's value step")
    p.add_argument(
        "--steps", type=float, nargs="*", default=[0.0015, 0.005, 0.04], help="other value steps to compare"
    )
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--keep", type=Path, default=None, help="write the cache here (kept) instead of a temp folder"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = load_recipe("quickstart")
    assert recipe.teacher is not None and recipe.teacher.kind == "live" and recipe.student.prune is not None
    log("loading the teacher")
    lm = load_model(recipe.teacher.model)
    teacher, tok = lm.model, lm.tokenizer
    vocab = min(teacher.get_output_embeddings().weight.shape[0], len(tok))
    answers, source = teacher_answers(recipe, teacher, tok, args.prompts)
    examples, dropped = tokenize_examples(tok, answers, recipe.data.max_length, recipe.data.system_prompt)
    n_tokens = sum(e.num_loss_tokens for e in examples)

    work = Path(tempfile.mkdtemp(prefix="distill-cache-bench-"))
    folder = args.keep or work / "cache"
    if args.keep and folder.exists():
        shutil.rmtree(folder)
    capture = Capturing(LiveTeacher(teacher, vocab), args.k)
    log(f"caching {len(examples)} examples ({n_tokens} answer tokens) at k={args.k}")
    t0 = time.perf_counter()
    manifest = write_cache(
        capture,
        examples,
        folder,
        k=args.k,
        temperature=1.0,
        teacher_id=lm.source,
        tokenizer_hash=tokenizer_fingerprint(tok),
        vocab_size=vocab,
        shard_size=args.shard_size,
        batch_size=recipe.data.batch_size,
        value_step=args.value_step,
    )
    cache_s = time.perf_counter() - t0

    log("student log-probs at the exact top-k ids")
    student, _ = prune_depth(teacher, recipe.student.prune)
    logq = student_logq(student.eval(), examples, capture.exact, vocab)
    del student

    src = CachedTeacherSource(folder, tokenizer_hash=tokenizer_fingerprint(tok))
    t0 = time.perf_counter()
    src.index()
    open_s = time.perf_counter() - t0
    decoded, read_s, read_tokens = served_rows(src, examples, recipe.data.batch_size)
    fid = fidelity(capture.exact, decoded, logq)
    near = fidelity(capture.exact, decoded, capture.near)["vs_student"]
    kl_near = float(
        torch.cat([kl_to(lp, capture.near[key]) for key, (_, lp) in capture.exact.items()]).mean()
    )
    kl_student = float(torch.cat([kl_to(lp, logq[key]) for key, (_, lp) in capture.exact.items()]).mean())

    rows = [(args.value_step, manifest.bytes_per_token, fid)]
    for step in args.steps:
        other = work / f"step-{step}"
        m = write_cache(
            Replay(capture.exact, vocab),
            examples,
            other,
            k=args.k,
            temperature=1.0,
            teacher_id=lm.source,
            tokenizer_hash=manifest.tokenizer_hash,
            vocab_size=vocab,
            shard_size=args.shard_size,
            batch_size=64,
            value_step=step,
        )
        dec, _, _ = served_rows(CachedTeacherSource(other), examples, 64)
        rows.append((step, m.bytes_per_token, fidelity(capture.exact, dec, logq)))

    bpt = manifest.bytes_per_token
    a, b = fid["vs_student"], fid["self"]
    print()
    print(f"offline top-k cache, quickstart teacher ({lm.source}), k = {args.k}, T = 1")
    print(f"data: {source}; {len(examples)} examples ({dropped} dropped), {n_tokens} answer tokens")
    print(
        f"encoding: {manifest.encoding['name']}, value step {args.value_step} ({manifest.encoding['values']['levels']} levels), zstd {manifest.encoding['parquet']['level']}"
    )
    print()
    print(
        f"cache size        {manifest.total_bytes} bytes in {len(manifest.shards)} shard(s) = {bpt:.1f} bytes/token   (raw float32 log-probs + int32 ids: {8 * args.k} bytes/token)"
    )
    print(
        f"cache time        {cache_s:.1f} s  ({n_tokens / cache_s:.0f} tokens/s; teacher forward + top-k + encode + write)"
    )
    print(
        f"reader            open+verify {open_s * 1e3:.1f} ms; signal() {read_s * 1e3:.1f} ms for {read_tokens} tokens = {read_tokens / max(read_s, 1e-9):.0f} tokens/s"
    )
    print()
    print(
        "fidelity over answer tokens (p_exact = exact top-k renormalised; p_dec = decoded top-k renormalised, same ids):"
    )
    print(
        f"  (a) |KL(p_exact||q) - KL(p_dec||q)|, q = untrained pruned 6-layer student (mean KL(p_exact||q) = {kl_student:.2f} nats):"
    )
    print(
        f"      mean {a.mean():.2e}   median {np.median(a):.2e}   p99 {np.quantile(a, 0.99):.2e}   max {a.max():.2e}"
    )
    print(
        f"  (a') the same with q = the teacher itself at T=2, a stand-in for a trained student (mean KL(p_exact||q) = {kl_near:.2f} nats):"
    )
    print(
        f"      mean {near.mean():.2e}   median {np.median(near):.2e}   p99 {np.quantile(near, 0.99):.2e}   max {near.max():.2e}"
    )
    print("  (b) KL(p_exact||p_dec), the decoded distribution's own error:")
    print(
        f"      mean {b.mean():.2e}   median {np.median(b):.2e}   p99 {np.quantile(b, 0.99):.2e}   max {b.max():.2e}"
    )
    print()
    print("value step   bytes/token   (a) mean |dKL| vs student   (b) mean KL(p_exact||p_dec)")
    for step, size, f in sorted(rows, key=lambda r: r[0]):
        mark = "  <- this cache" if step == args.value_step else ""
        print(
            f"{step:10.4g}   {size:11.1f}   {f['vs_student'].mean():25.2e}   {f['self'].mean():27.2e}{mark}"
        )
    print()
    print("target                                        measured     verdict")
    print(f"bytes/token <= 100                            {bpt:8.1f}     {verdict(bpt <= 100)}")
    print(f"(a) mean |KL diff| vs student <= 1e-3 nats    {a.mean():8.2e}     {verdict(a.mean() <= 1e-3)}")
    print(f"(b) mean KL(p_exact||p_dec) <= 1e-3 nats      {b.mean():8.2e}     {verdict(b.mean() <= 1e-3)}")
    if not math.isclose(read_tokens, n_tokens):
        print(f"WARNING: the reader served {read_tokens} tokens for {n_tokens} answer tokens")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
