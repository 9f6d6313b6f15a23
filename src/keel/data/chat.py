"""The chat template: how a conversation becomes token ids and a loss mask.

One function, `render`, serves both `keel prepare` (SFT examples, preference pairs) and `keel chat`,
so training and inference see the same layout:

    [<|endoftext|>] then, per message, [<|role|>] + ids(content) + [<|end|>]

keel's documents start after `<|endoftext|>`, so the sequence starts with it too. The role
markers (`<|system|>`, `<|user|>`, `<|assistant|>`) and the end-of-turn marker `<|end|>` are
special tokens appended to the base tokenizer's vocabulary (ids V, V+1, ...), so every id of
the base model keeps its meaning. They are only ever inserted by id: with
`encode_special_tokens = True` a literal "<|user|>" inside a message is encoded as plain text,
so content cannot forge a turn.

The loss mask is 1 exactly on the assistant's content tokens and its `<|end|>` (the model must
learn to stop), 0 on markers and on system and user turns. `add_generation_prompt=True` appends
`<|assistant|>` (mask 0): the point where a model starts its reply.

A plain prompt/completion pair has no turns: `[<|endoftext|>] + ids(prompt) + ids(completion) +
[<|endoftext|>]`, with the mask on the completion and the final `<|endoftext|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tokenizers import AddedToken, Tokenizer

from keel.data.tokenizer import EOT
from keel.errors import UserError

SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)  # appended in this order
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = tuple(ROLE_TOKENS)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class Template:
    """The ids of the template's special tokens in one tokenizer."""

    eot_id: int
    end_id: int
    system_id: int
    user_id: int
    assistant_id: int

    def role_id(self, role: str) -> int:
        return {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}[role]

    def to_dict(self) -> dict:
        return {
            "eot_id": self.eot_id,
            "end_id": self.end_id,
            "system_id": self.system_id,
            "user_id": self.user_id,
            "assistant_id": self.assistant_id,
        }


class Piece(NamedTuple):
    """A stretch of a sequence before encoding: a special token id or a text, and whether it carries loss."""

    content: int | str
    loss: bool


def add_chat_tokens(tokenizer: Tokenizer) -> Template:
    """Append the chat markers missing from `tokenizer` (markers already there keep their ids)."""
    missing = [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    tokenizer.encode_special_tokens = True
    return template_of(tokenizer)


def template_of(tokenizer: Tokenizer) -> Template:
    """The template ids of a tokenizer that has the chat markers."""
    ids = {token: tokenizer.token_to_id(token) for token in (EOT, *CHAT_TOKENS)}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise UserError(
            f"the tokenizer has no {', '.join(missing)} token; use the tokenizer.json of a data directory that keel "
            "prepare wrote for SFT examples or preference pairs"
        )
    return Template(ids[EOT], ids[END], ids[SYSTEM], ids[USER], ids[ASSISTANT])


def chat_pieces(template: Template, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[Piece]:
    """The pieces of a conversation (see the module docstring); roles are checked by the caller."""
    pieces = [Piece(template.eot_id, False)]
    for message in messages:
        is_assistant = message["role"] == "assistant"
        pieces += [
            Piece(template.role_id(message["role"]), False),
            Piece(message["content"], is_assistant),
            Piece(template.end_id, is_assistant),
        ]
    if add_generation_prompt:
        pieces.append(Piece(template.assistant_id, False))
    return pieces


def plain_pieces(template: Template, prompt: str, completion: str) -> list[Piece]:
    """The pieces of a prompt/completion pair without turns."""
    return [Piece(template.eot_id, False), Piece(prompt, False), Piece(completion, True), Piece(template.eot_id, True)]


def encode_pieces(tokenizer: Tokenizer, sequences: Sequence[Sequence[Piece]]) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of each sequence of pieces; the texts of all sequences are encoded in one batch."""
    tokenizer.encode_special_tokens = True  # keel's setting (not saved in tokenizer.json): markers in text stay text
    texts = [piece.content for pieces in sequences for piece in pieces if isinstance(piece.content, str)]
    encoded = iter(tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    results = []
    for pieces in sequences:
        ids: list[int] = []
        mask: list[int] = []
        for content, loss in pieces:
            piece_ids = next(encoded).ids if isinstance(content, str) else [content]
            ids += piece_ids
            mask += [int(loss)] * len(piece_ids)
        results.append((ids, mask))
    return results


def render(
    tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a conversation under the chat template; the tokenizer must have the chat markers."""
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise UserError(
                f"cannot render message {message!r}: it needs a role ({', '.join(ROLES)}) and a content string"
            )
    pieces = chat_pieces(template_of(tokenizer), messages, add_generation_prompt=add_generation_prompt)
    return encode_pieces(tokenizer, [pieces])[0]


def jinja_template() -> str:
    """The template as the Jinja source that Hugging Face's `apply_chat_template` (and llama.cpp's --jinja) run.

    It renders the markers as text, which those tokenizers split off as special tokens before encoding the
    rest, so the ids equal `render`'s for any content that does not itself contain a marker's text (keel
    encodes such text as text; Hugging Face tokenizers take it as the marker). An unknown role is an error,
    as in `render`.
    """
    markers = ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items())
    return (
        f"{{% set markers = {{{markers}}} %}}"
        f"{{{{ '{EOT}' }}}}"
        "{% for message in messages %}"
        "{% if message['role'] not in markers %}"
        f"{{{{ raise_exception('a message needs a role ({', '.join(ROLES)})') }}}}"
        "{% endif %}"
        f"{{{{ markers[message['role']] + message['content'] + '{END}' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{ASSISTANT}' }}}}{{% endif %}}"
    )
