"""Ondol's chat format, defined once: the ids of a conversation for training data (`ondol data prepare` of a chat
source), for `ondol generate --chat`, and the Jinja chat template of the exported tokenizer_config.json that gives
the same ids in transformers' `apply_chat_template(..., tokenize=True)`.

A conversation is bos (when training documents start with it, data.bos), then per message the role's control
token, the content's tokens and the end-of-turn token:

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

A prompt for a reply ends with an open `<|assistant|>`; generation stops at `<|end|>`. The loss mask marks the
tokens a model is trained to produce: each assistant message's content and its `<|end|>`; never the role tokens,
bos, or what the user and system wrote. Contents are encoded as ordinary text, so a role token's name typed into a
message stays text in Ondol (the HF tokenizer reads it as the control token: such text is the one difference).
The role tokens are tokenizer.special_tokens' defaults, control ids after unk, bos, eos and pad: a tokenizer
without them has no chat format, and `chat_ids` says which are missing.
"""

from __future__ import annotations

from ondol.errors import TokenizerError

MESSAGES = "messages"  # the JSON Lines field of a chat source
ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"


def role_token(role: str) -> str:
    return f"<|{role}|>"


CHAT_TOKENS = (*(role_token(r) for r in ROLES), END_OF_TURN)


def chat_template(bos: bool) -> str:
    """The Jinja template of the same format. An unknown role raises (`check_messages` counts it); an assistant
    message's content and end-of-turn sit in a generation block, so `return_assistant_tokens_mask=True` gives the
    loss mask."""
    roles = ", ".join(f"'{r}'" for r in ROLES)
    turn = role_token("{{ message['role'] }}")
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        + f"{{% if message['role'] not in [{roles}] %}}"
        + "{{ raise_exception('unknown role ' + message['role'] + ': use " + " | ".join(ROLES) + "') }}"
        + "{% endif %}"
        + turn
        + "{% if message['role'] == 'assistant' %}{% generation %}"
        + "{{ message['content'] }}" + END_OF_TURN
        + "{% endgeneration %}{% else %}"
        + "{{ message['content'] }}" + END_OF_TURN
        + "{% endif %}{% endfor %}"
        + "{% if add_generation_prompt %}" + role_token("assistant") + "{% endif %}"
    )


def missing_chat_tokens(special_tokens: dict[str, int]) -> list[str]:
    return [t for t in CHAT_TOKENS if t not in special_tokens]


def chat_ids(tokenizer) -> dict[str, int]:
    """Role name (and END_OF_TURN) -> control id; a ValueError naming the missing tokens when there are some."""
    special = tokenizer.special_tokens
    if missing := missing_chat_tokens(special):
        raise TokenizerError(f"the tokenizer has no chat tokens {', '.join(missing)}: train it with the default "
                         "tokenizer.special_tokens (they hold Ondol's chat roles)")
    return {**{r: special[role_token(r)] for r in ROLES}, END_OF_TURN: special[END_OF_TURN]}


def check_messages(value: object) -> tuple[str, str]:
    """('', '') for a conversation Ondol can train on, else (bad-input reason, what is wrong): a list of
    {role, content} objects, roles among ROLES, contents strings, at least one assistant message."""
    if value is None:
        return "missing_messages", f"no field '{MESSAGES}' (a chat line holds a list of {{role, content}})"
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else f"a JSON {type(value).__name__}"
        return "bad_messages", f"'{MESSAGES}' is {what}, not a list of {{role, content}} objects"
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return "bad_messages", f"message {i} is {type(message).__name__}, not a {{role, content}} object"
        role = message.get("role")
        if role not in ROLES:
            return "unknown_role", f"message {i} has role {role!r}: use {' | '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return "content_not_string", (f"message {i} ({role}) has content of type "
                                          f"{type(message.get('content')).__name__}, not a string")
    if not any(m["role"] == "assistant" for m in value):
        return "no_assistant_message", "no assistant message: nothing to train on"
    return "", ""


def encode_conversations(tokenizer, conversations: list[list[tuple[str, str]]], bos: bool,
                         generation_prompt: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of each conversation of (role, content) pairs, the contents encoded in one batch. With
    `generation_prompt` the ids end with an open assistant turn (a prompt for the reply)."""
    ids_of = chat_ids(tokenizer)
    contents = iter(tokenizer.encode_batch([content for conv in conversations for _, content in conv]))
    out = []
    for conv in conversations:
        ids, mask = [tokenizer.bos_id] * bos, [0] * bos
        for role, _ in conv:
            text = next(contents)
            produced = int(role == "assistant")
            ids += [ids_of[role], *text, ids_of[END_OF_TURN]]
            mask += [0, *[produced] * len(text), produced]
        if generation_prompt:
            ids.append(ids_of["assistant"])
            mask.append(0)
        out.append((ids, mask))
    return out
