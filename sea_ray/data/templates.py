"""Conversation templates and label masking: text -> ``input_ids`` + ``labels`` (no torch).

Three templates, as in LLaVA-1.5:

* ``plain`` (stage 1, ``align``): ``[bos] <image> caption eos``; only the caption and the eos
  are supervised. ``bos`` is there only when the tokenizer defines one and adds it by itself.
* ``llava_v1`` (stage 2, ``instruct``): the Vicuna v1 conversation of LLaVA-1.5::

      {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

  (sep ``" "``, sep2 = the tokenizer's eos token); only the answers and their eos are supervised.
* ``chat`` (stage 2): the tokenizer's own ``apply_chat_template`` with ``user``/``assistant``
  roles. Assistant spans come from ``{% generation %}`` blocks when the template has them, else
  from rendering the conversation turn by turn (the answer is what the ``k``-th assistant message
  adds to the prompt that ends with the generation prompt). Surrounding whitespace is never
  supervised; the template's end-of-turn marker after an answer is.

In every template the ``<image>`` placeholder becomes exactly one ``IMAGE_TOKEN_INDEX``
sentinel, which the model later replaces by the visual tokens: the rendered text is split on the
placeholder, each piece is tokenized without special tokens and the pieces are joined with the
sentinel (LLaVA's ``tokenizer_image_token``). Whitespace around the placeholder is kept as
written (the world's and LLaVA's manifests put ``"<image>\\n"`` first in the first question).
Labels are assigned from character spans: a token is supervised when its characters overlap
an answer span of the rendered text, so the tokenization is exactly that of the whole string.

``max_length`` counts text tokens plus one for the sentinel (visual tokens are not counted).
Longer samples are cut from the end; a sample whose sentinel would be cut, or that has no
supervised token left, raises :class:`SkipSample`: the caller skips the row and records the
reason (``manifest_error(row, item, str(exc), stage="template")``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from sea_ray.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

TEMPLATES = ("plain", "llava_v1", "chat")
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_ROLES = ("USER", "ASSISTANT")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SkipSample(ValueError):
    """A sample that cannot be encoded (too long, nothing supervised, malformed turns).

    The data pipeline skips the row and records ``str(exc)`` as its reason."""


# --------------------------------------------------------------------------- helpers


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer defines a bos token and puts it in front of text by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _eos(tokenizer) -> tuple[int, str]:
    eos_id, eos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "eos_token", None)
    if eos_id is None or eos is None:
        raise ValueError(f"{type(tokenizer).__name__} defines no eos token; the templates need one")
    return eos_id, eos


def _messages(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA turns -> [{"role": "user"|"assistant", "content": str}], checking the alternation."""
    if not conversations:
        raise SkipSample("empty conversation")
    messages = []
    for i, turn in enumerate(conversations):
        role = _ROLE_ALIASES.get(turn.get("from", turn.get("role")) if isinstance(turn, dict) else None)
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        want = "user" if i % 2 == 0 else "assistant"
        if role != want or not isinstance(value, str):
            raise SkipSample(f"turn {i} is malformed (expected a {want} turn with a string value)")
        messages.append({"role": role, "content": value})
    if len(messages) % 2:
        raise SkipSample("the last turn is not an answer")
    n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_images > 1:
        raise SkipSample(f"{n_images} {IMAGE_PLACEHOLDER} placeholders (at most one per sample)")
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "assistant"):
        raise SkipSample(f"{IMAGE_PLACEHOLDER} placeholder in an answer")
    return messages


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < s_end and end > s_start for s_start, s_end in spans)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without its leading/trailing whitespace (formatting, never supervised)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _tokenize_piece(tokenizer, piece: str, base: int, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``piece`` (no special tokens added) and, per token, whether it is supervised."""
    if not piece:
        return [], []
    try:
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except NotImplementedError:  # a slow tokenizer: no offsets
        return _tokenize_piece_by_segments(tokenizer, piece, base, spans)
    ids = list(enc["input_ids"])
    return ids, [_overlaps(base + s, base + e, spans) for s, e in offsets]


def _tokenize_piece_by_segments(tokenizer, piece: str, base: int,
                                spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Fallback without offsets: cut the piece at span boundaries, tokenize each segment alone.

    A span's cut moves left over spaces, which BPE and SentencePiece attach to the next word."""
    cuts = {0, len(piece)}
    for s, e in spans:
        s -= base
        while 0 < s <= len(piece) and piece[s - 1] == " ":
            s -= 1
        for c in (s, e - base):
            if 0 < c < len(piece):
                cuts.add(c)
    ids: list[int] = []
    sup: list[bool] = []
    bounds = sorted(cuts)
    for a, b in zip(bounds, bounds[1:]):
        seg_ids = tokenizer(piece[a:b], add_special_tokens=False)["input_ids"]
        supervised = _overlaps(base + a, base + b, spans)
        ids += seg_ids
        sup += [supervised] * len(seg_ids)
    return ids, sup


def _encode_text(text: str, spans: Sequence[tuple[int, int]], tokenizer, bos: bool) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` with the placeholder as the sentinel; supervise tokens inside ``spans``."""
    input_ids: list[int] = [tokenizer.bos_token_id] if bos else []
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    base = 0
    for j, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if j:
            input_ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            base += len(IMAGE_PLACEHOLDER)
        ids, sup = _tokenize_piece(tokenizer, piece, base, spans)
        input_ids += ids
        labels += [t if s else IGNORE_INDEX for t, s in zip(ids, sup)]
        base += len(piece)
    return input_ids, labels


def _finish(input_ids: list[int], labels: list[int], max_length: int) -> dict:
    """Truncate from the end, keeping the sentinel; refuse a sample with nothing supervised."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(input_ids) > max_length:
        if IMAGE_TOKEN_INDEX in input_ids and input_ids.index(IMAGE_TOKEN_INDEX) >= max_length:
            raise SkipSample(f"the {IMAGE_PLACEHOLDER} placeholder is beyond max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise SkipSample(f"no supervised tokens left after truncation to max_length={max_length}")
    if all(t == IGNORE_INDEX for t in labels):
        raise SkipSample("no supervised tokens")
    return {"input_ids": input_ids, "labels": labels}


# --------------------------------------------------------------------------- templates


def encode_plain(caption: str, tokenizer, max_length: int) -> dict:
    """LLaVA ``plain`` (stage 1): ``[bos] <image> caption eos``; caption + eos supervised.

    The caption is cut so that the whole sample fits ``max_length`` (the sentinel counts as one
    token); the eos is always kept."""
    if not isinstance(caption, str) or not caption.strip():
        raise SkipSample("empty caption")
    if IMAGE_PLACEHOLDER in caption:
        raise SkipSample(f"{IMAGE_PLACEHOLDER} placeholder in the caption")
    eos_id, _ = _eos(tokenizer)
    prefix = ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []) + [IMAGE_TOKEN_INDEX]
    room = max_length - len(prefix) - 1
    if room < 1:
        raise SkipSample(f"max_length={max_length} leaves no room for the caption")
    text_ids = list(tokenizer(caption, add_special_tokens=False)["input_ids"])[:room] + [eos_id]
    return {"input_ids": prefix + text_ids, "labels": [IGNORE_INDEX] * len(prefix) + text_ids}


def render_llava_v1(turns: Sequence[tuple[str, Optional[str]]], eos: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The one rendering of LLaVA-1.5's Vicuna v1 conversation: ``(question, answer)`` pairs ->
    ``{system} USER: {q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}`` and the character
    spans of the answers with their eos (surrounding whitespace left out). A last answer of None
    ends the text at ``ASSISTANT:``, the prompt of a generation (the answer's leading space
    belongs to its first token). Questions are written as given (``<image>`` included)."""
    user, assistant = LLAVA_V1_ROLES
    text = LLAVA_V1_SYSTEM + " "
    spans = []
    for i, (question, answer) in enumerate(turns):
        text += f"{user}: {question} {assistant}:"
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may be without an answer (the generation prompt)")
            break
        text += " "
        start = len(text)
        text += answer + eos
        spans.append(_strip_span(text, start, len(text)))
    return text, spans


# Jinja for chat templates of exported models (sea_ray.export): turns a message whose content is a
# list of parts ({"type": "image"}, {"type": "text", "text": ...}) into the string sea_ray trains on,
# "<image>\n" before the text, then leaves ``messages`` to the template that follows.
_FLATTEN_CONTENT = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set part = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set part.text = part.text + '" + IMAGE_PLACEHOLDER + "\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set part.text = part.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = part.text -%}{%- endif -%}"
    "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': content}] -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)


def llava_v1_chat_template() -> str:
    """:func:`render_llava_v1` as a Jinja chat template (``eos_token`` after each answer; the
    generation prompt ends at ``ASSISTANT:``). A leading system message replaces the default system
    text."""
    user, assistant = LLAVA_V1_ROLES
    return (_FLATTEN_CONTENT
            + "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{- messages[0]['content'] + ' ' -}}{%- set messages = messages[1:] -%}"
            "{%- else -%}{{- " + repr(LLAVA_V1_SYSTEM + " ") + " -}}{%- endif -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{- '" + user + ": ' + message['content'] + ' ' -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- '" + assistant + ": ' + message['content'] + eos_token -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '" + assistant + ":' -}}{%- endif -%}")


def chat_template_with_images(template: str) -> str:
    """An LLM's own chat template that also takes content lists with image parts."""
    return _FLATTEN_CONTENT + template


def _render_chat_generation_tags(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and assistant spans from the template's ``{% generation %}`` blocks."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        tokenizer_kwargs={"return_offsets_mapping": True})
    spans: list[tuple[int, int]] = []
    for (s, e), m in zip(out["offset_mapping"], out["assistant_masks"]):
        if not m:
            continue
        if spans and s <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(e, spans[-1][1]))
        else:
            spans.append((s, e))
    return text, [_strip_span(text, s, e) for s, e in spans]


def _render_chat_incremental(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and assistant spans by rendering the conversation turn by turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i in range(1, len(messages), 2):
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(prompt) or not text.startswith(full):
            raise ValueError("the tokenizer's chat template does not render a conversation as a prefix of its "
                             "continuation, so assistant turns cannot be located; add {% generation %} blocks "
                             "to the template or use template=llava_v1")
        spans.append(_strip_span(text, len(prompt), len(full)))
    return text, spans


def _has_generation_tags(template: str) -> bool:
    import re

    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", template))


def encode_conversation(conversations: Sequence[dict], tokenizer, template: str, max_length: int) -> dict:
    """Stage 2: a multi-turn conversation -> ``input_ids`` + ``labels`` (answers supervised).

    ``conversations`` is LLaVA's ``[{"from": "human"|"gpt", "value": str}, ...]`` (``role``/
    ``content`` and ``user``/``assistant`` are accepted too), starting with a question and
    alternating. ``template`` is ``llava_v1``, ``chat`` or ``auto`` (see :func:`resolve_template`).
    Raises :class:`SkipSample` for a sample the caller should skip and report."""
    template = resolve_template(template, tokenizer)
    if template == "plain":
        raise ValueError("the plain template takes a caption: use encode_plain (or encode_row)")
    messages = _messages(conversations)
    if template == "llava_v1":
        _, eos = _eos(tokenizer)
        text, spans = render_llava_v1([(messages[i]["content"], messages[i + 1]["content"])
                                       for i in range(0, len(messages), 2)], eos)
        bos = adds_bos(tokenizer)
    else:
        chat_template = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") \
            else tokenizer.chat_template
        render = _render_chat_generation_tags if _has_generation_tags(chat_template) else _render_chat_incremental
        text, spans = render(messages, tokenizer)
        bos = False  # a chat template writes its own bos (apply_chat_template adds no special tokens)
    input_ids, labels = _encode_text(text, spans, tokenizer, bos)
    return _finish(input_ids, labels, max_length)


def resolve_template(name: str, tokenizer) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``llava_v1``; other names
    are checked (``chat`` needs a chat template)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        return "chat" if has_chat else "llava_v1"
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid: auto, {', '.join(TEMPLATES)}")
    if name == "chat" and not has_chat:
        raise ValueError(f"template 'chat' but {type(tokenizer).__name__} has no chat template; "
                         "use llava_v1 (or auto)")
    return name


def encode_row(row: dict, tokenizer, template: str, max_length: int) -> dict:
    """A manifest row (see ``sea_ray.data.manifest``) encoded with ``template``: ``plain`` uses
    its caption (the first answer), the others its whole conversation."""
    if template == "plain":
        turns = row.get("conversations") or []
        caption: Optional[str] = turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None
        return encode_plain((caption or "").strip(), tokenizer, max_length)
    return encode_conversation(row["conversations"], tokenizer, template, max_length)
