"""KD from the offline cache vs KD from the live teacher, at equal steps, from two finished runs.

    distill quickstart                 # live teacher (also writes runs/quickstart)
    distill cache quickstart           # top-64 cache of the same training answers
    distill run quickstart-cache       # same recipe, teacher.kind: cache
    python benchmarks/cache_vs_live.py

Prints held-out KL(teacher||student) of both students (both evaluated against the exact live teacher),
their ratio (target: within 5 %), and the median training-step time ratio cache/live.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=Path, default=Path("runs/quickstart/eval.json"))
    ap.add_argument("--cache", type=Path, default=Path("runs/quickstart-cache/eval.json"))
    args = ap.parse_args()
    live = json.loads(args.live.read_text())["methods"]["logit_kd"]
    cache = json.loads(args.cache.read_text())["methods"]["logit_kd"]
    if live["steps"] != cache["steps"]:
        raise SystemExit(f"unequal steps: live {live['steps']} vs cache {cache['steps']}")
    kl_live, kl_cache = live["after"]["kl"], cache["after"]["kl"]
    rel = kl_cache / kl_live - 1
    t_live, t_cache = live["step_seconds_median"], cache["step_seconds_median"]
    print(f"steps                         {live['steps']}")
    print(f"held-out KL, live teacher     {kl_live:.4f}")
    print(
        f"held-out KL, cached top-k     {kl_cache:.4f}   ({rel:+.1%}; target within 5 %: {'PASS' if abs(rel) <= 0.05 else 'FAIL'})"
    )
    print(
        f"top-1 agreement live / cache  {live['after']['top1_agreement']:.4f} / {cache['after']['top1_agreement']:.4f}"
    )
    print(
        f"median step s, live / cache   {t_live:.3f} / {t_cache:.3f}   (cache/live = {t_cache / t_live:.2f})"
    )


if __name__ == "__main__":
    main()
