"""Turn examples into token ids with the chat template, marking which tokens carry loss (the answer only)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.records import Example


@dataclass
class TokenizedExample:
    input_ids: list[int]
    prompt_len: int  # tokens before the answer; the answer (and its end token) carries the loss

    @property
    def num_loss_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def _as_ids(out: object) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]  # type: ignore[index]
    return list(out)  # type: ignore[call-overload]


def prompt_ids(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], system_prompt: str | None
) -> list[int]:
    """Ids of the conversation up to and including the assistant header (what generation starts from)."""
    msgs = list(messages)
    if system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    if tok.chat_template:
        return _as_ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    text = "\n".join(m["content"] for m in msgs) + "\n"
    return _as_ids(tok(text, add_special_tokens=True)["input_ids"])


def completion_ids(tok: PreTrainedTokenizerBase, completion: str, finished: bool = True) -> list[int]:
    """Answer ids followed by the end token (when the answer really ended), so the student learns where
    to stop."""
    ids = _as_ids(tok(completion, add_special_tokens=False)["input_ids"])
    if finished and tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return ids


def tokenize_examples(
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    max_length: int,
    system_prompt: str | None,
    *,
    prompts_only: bool = False,
) -> tuple[list[TokenizedExample], int]:
    """Tokenise; answers are cut to fit `max_length`. Returns the examples and how many were dropped
    (prompt alone too long, or no answer unless `prompts_only`: methods that write every answer
    themselves keep prompts without one)."""
    out: list[TokenizedExample] = []
    dropped = 0
    for ex in examples:
        if ex.completion is None and not prompts_only:
            dropped += 1
            continue
        p = prompt_ids(tok, ex.prompt, system_prompt)
        c = completion_ids(tok, ex.completion, ex.finished) if ex.completion is not None else []
        if len(p) >= max_length - 1:
            dropped += 1
            continue
        ids = (p + c)[:max_length]
        out.append(TokenizedExample(input_ids=ids, prompt_len=len(p)))
    return out, dropped
