#!/usr/bin/env python
"""Write the reranking pairs the `minilm-rerank` recipe trains and evaluates on, from Python's stdlib.

    python scripts/rerank_pairs.py            # writes src/distill/recipes/data/rerank_{train,heldout}.jsonl

Each public function, class or method of a fixed list of pure-Python standard-library modules whose
docstring has a one-sentence summary and a body gives one pair: query = the summary sentence ("Split a
pathname into drive and path."), passage = `name(signature): body` (the body without the summary, cut at
a word boundary to `--max-chars`). Duplicate queries and passages are dropped (first kept). The split is
by module (a module hash decides), so held-out queries and their passages come from modules never seen
in training, and near-identical docstrings of one module cannot leak across. The files are shipped, so
the data does not change with the Python version; this script (Python 3.11 here) documents how they were
made and regenerates them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import warnings
from pathlib import Path

_MODULE_NAMES = (  # one word per module
    "abc argparse asyncio.base_events asyncio.events asyncio.locks asyncio.queues asyncio.streams "
    "asyncio.transports base64 bdb bisect bz2 calendar cmd code codecs collections colorsys "
    "concurrent.futures._base configparser contextlib copy csv dataclasses datetime decimal difflib doctest "
    "email.charset email.message email.parser email.utils enum filecmp fnmatch fractions ftplib functools "
    "getopt gettext glob graphlib gzip hashlib heapq hmac html.parser http.client http.cookiejar http.server "
    "imaplib importlib.abc importlib.metadata inspect ipaddress json locale logging logging.handlers lzma "
    "mailbox mimetypes ntpath numbers optparse os pathlib pdb pickle pkgutil platform plistlib poplib "
    "posixpath pprint queue quopri random reprlib sched secrets selectors shelve shlex shutil site smtplib "
    "socket socketserver ssl statistics string subprocess symtable sysconfig tarfile tempfile textwrap "
    "threading timeit tkinter tkinter.ttk tokenize trace traceback turtle types typing unittest.case "
    "unittest.mock urllib.parse urllib.request uuid venv warnings weakref xml.dom.minidom xml.dom.pulldom "
    "xml.etree.ElementTree xml.sax.handler xml.sax.saxutils xmlrpc.server zipfile zipimport"
)
MODULES = tuple(_MODULE_NAMES.split())
OUT = Path(__file__).resolve().parents[1] / "src" / "distill" / "recipes" / "data"
SENTENCE = re.compile(r"^[A-Z][^\n]{14,160}?[.]$")


def clean(text: str) -> str:
    return " ".join(text.split())


def cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit].rsplit(" ", 1)[0]
    return head.rstrip(",;:") + " ..."


def members(module: object) -> list[tuple[str, object]]:
    """Public functions and classes defined in `module`, and their public methods, in name order."""
    out = []
    name = getattr(module, "__name__", "")
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isfunction(obj):
            out.append((attr, obj))
        elif inspect.isclass(obj):
            out.append((attr, obj))
            for meth, fn in sorted(vars(obj).items()):
                if not meth.startswith("_") and inspect.isfunction(fn):
                    out.append((f"{attr}.{meth}", fn))
    return out


def pair(name: str, obj: object, max_chars: int) -> dict[str, str] | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    summary, _, body = doc.strip().partition("\n\n")
    summary, body = clean(summary), clean(body)
    if not SENTENCE.match(summary) or len(body) < 40 or ">>>" in body[:40]:
        return None
    try:
        signature = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        signature = "(...)"
    signature = re.sub(r" at 0x[0-9a-f]+", "", signature)  # default values' reprs: no memory addresses
    if len(signature) > 80:
        signature = "(...)"
    return {"query": summary, "passage": cut(f"{name}{signature}: {body}", max_chars)}


def module_order(module: str) -> int:
    """A fixed pseudo-random rank of a module name (sha256), independent of PYTHONHASHSEED."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-chars", type=int, default=320)
    p.add_argument("--per-module", type=int, default=40, help="at most this many pairs from one module")
    p.add_argument("--heldout-percent", type=int, default=20)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    seen_q: set[str] = set()
    seen_p: set[str] = set()
    by_module: dict[str, list[dict[str, str]]] = {}
    warnings.simplefilter("ignore")
    for mod_name in MODULES:
        module = importlib.import_module(mod_name)
        rows = by_module.setdefault(mod_name, [])
        for name, obj in members(module):
            row = pair(name, obj, args.max_chars)
            if row is None or row["query"].lower() in seen_q or row["passage"] in seen_p:
                continue
            seen_q.add(row["query"].lower())
            seen_p.add(row["passage"])
            rows.append({**row, "module": mod_name})
            if len(rows) == args.per_module:
                break
    # whole modules go to the held-out part, in sha256 order, until it holds the asked share of pairs
    total, split = sum(map(len, by_module.values())), {"train": [], "heldout": []}
    for mod_name in sorted(by_module, key=module_order):
        held = len(split["heldout"]) < total * args.heldout_percent / 100
        split["heldout" if held else "train"].extend(by_module[mod_name])
    for part, rows in split.items():
        rows.sort(key=lambda r: MODULES.index(r["module"]))  # stable: module order, then member order
        path = args.out / f"rerank_{part}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        modules = len({r["module"] for r in rows})
        print(f"{path}: {len(rows)} pairs from {modules} modules, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
