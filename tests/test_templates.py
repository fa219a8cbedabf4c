"""Templates and masking (plain, llava_v1, chat)."""

import pytest

from sea_ray.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from sea_ray.data.manifest import read_manifest
from sea_ray.data.templates import (LLAVA_V1_SYSTEM, SkipSample, encode_conversation, encode_plain, encode_row,
                                    resolve_template)
from sea_ray.model.llm import load_tokenizer

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "two objects"},
]
TEXT_ONLY = [{"from": "human", "value": "What is the opposite of left?"}, {"from": "gpt", "value": "right"}]

# A small chat template without {% generation %} blocks (spans found by incremental rendering).
CHAT = ("{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}User: {{ m.content }}\n"
        "{% else %}Bot: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Bot:{% endif %}")
# The same with generation blocks (spans from apply_chat_template's assistant mask).
CHAT_GEN = CHAT.replace("Bot: {{ m.content }}{{ eos_token }}",
                        "Bot: {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("world")


@pytest.fixture
def chat_tok():
    t = load_tokenizer("world")
    t.chat_template = CHAT
    return t


def supervised_runs(tokenizer, enc):
    """The decoded text of each contiguous run of supervised tokens."""
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t  # a label is the token itself (the model shifts)
            cur.append(lab)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def decoded(tokenizer, ids):
    return "".join("<image>" if t == IMAGE_TOKEN_INDEX else tokenizer.decode([t]) for t in ids)


# --------------------------------------------------------------------------- plain


def test_plain_masks_exactly_caption_and_eos(tok):
    caption = "a large red circle on the left, on a gray background"
    enc = encode_plain(caption, tok, max_length=64)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[0] == IMAGE_TOKEN_INDEX  # world tokenizer adds no bos
    caption_ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert ids[1:] == caption_ids + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] + caption_ids + [tok.eos_token_id]
    assert supervised_runs(tok, enc) == [caption + tok.eos_token]


def test_plain_adds_bos_when_the_tokenizer_does_and_truncation_keeps_eos():
    from tokenizers import processors

    tok = load_tokenizer("world")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    assert tok("red")["input_ids"][0] == tok.bos_token_id
    enc = encode_plain("a small blue square at the top", tok, max_length=5)
    assert len(enc["input_ids"]) == 5
    assert enc["input_ids"][:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert enc["labels"][:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert enc["input_ids"][-1] == tok.eos_token_id == enc["labels"][-1]
    assert enc["labels"][2:4] == tok("a small", add_special_tokens=False)["input_ids"]
    with pytest.raises(SkipSample):
        encode_plain("   ", tok, max_length=64)


# --------------------------------------------------------------------------- llava_v1


def test_llava_v1_multi_turn_supervises_only_answers(tok):
    enc = encode_conversation(CONV, tok, "llava_v1", max_length=512)
    ids = enc["input_ids"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    eos = tok.eos_token
    assert decoded(tok, ids) == (f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat color is the circle? ASSISTANT: red{eos}"
                                 f"USER: How many objects are there? ASSISTANT: two objects{eos}")
    assert [r.strip() for r in supervised_runs(tok, enc)] == [f"red{eos}", f"two objects{eos}"]
    assert sum(t == tok.eos_token_id for t in enc["labels"]) == 2


def test_llava_v1_text_only_and_auto_without_chat_template(tok):
    assert resolve_template("auto", tok) == "llava_v1"
    enc = encode_conversation(TEXT_ONLY, tok, "auto", max_length=512)
    assert IMAGE_TOKEN_INDEX not in enc["input_ids"]
    assert [r.strip() for r in supervised_runs(tok, enc)] == ["right" + tok.eos_token]


def test_truncation_keeps_the_sentinel_and_never_leaves_nothing_supervised(tok):
    full = encode_conversation(CONV, tok, "llava_v1", max_length=512)
    first_answer = next(i for i, t in enumerate(full["labels"]) if t != IGNORE_INDEX)
    cut = encode_conversation(CONV, tok, "llava_v1", max_length=first_answer + 1)
    assert len(cut["input_ids"]) == first_answer + 1 and cut["input_ids"].count(IMAGE_TOKEN_INDEX) == 1
    assert cut["input_ids"] == full["input_ids"][: first_answer + 1]
    assert sum(t != IGNORE_INDEX for t in cut["labels"]) == 1
    with pytest.raises(SkipSample, match="no supervised tokens left"):
        encode_conversation(CONV, tok, "llava_v1", max_length=first_answer)
    late = [{"from": "human", "value": "What is the opposite of left? " * 20 + "<image>"}, CONV[1]]
    with pytest.raises(SkipSample, match="beyond max_length"):
        encode_conversation(late, tok, "llava_v1", max_length=64)
    with pytest.raises(SkipSample, match="placeholders"):
        encode_conversation([{"from": "human", "value": "<image><image>"}, CONV[1]], tok, "llava_v1", 512)
    with pytest.raises(SkipSample, match="malformed"):
        encode_conversation(CONV[1:], tok, "llava_v1", 512)


def _sentencepiece_style_tokenizer():
    """A Llama/Vicuna-like tokenizer: Metaspace pre-tokenizer, byte fallback, adds <s> itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sea_ray.world.generator import world_words

    words = world_words()
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
                                     decoders.ByteFallback()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([" ".join(words)] * 4 + words + [LLAVA_V1_SYSTEM + " USER: ASSISTANT:"],
                            trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llava_v1_with_a_sentencepiece_style_tokenizer():
    tok = _sentencepiece_style_tokenizer()
    enc = encode_conversation(CONV, tok, "llava_v1", max_length=512)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["labels"][0] == IGNORE_INDEX
    assert enc["input_ids"].count(IMAGE_TOKEN_INDEX) == 1
    assert [r.strip() for r in supervised_runs(tok, enc)] == ["red</s>", "two objects</s>"]
    plain = encode_plain("a red circle", tok, max_length=32)
    assert plain["input_ids"][:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert supervised_runs(tok, plain) == ["a red circle</s>"]


def test_slow_tokenizer_fallback_matches(tok):
    class NoOffsets:  # a tokenizer without offset mappings (as Python tokenizers are)
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kw):
            if kw.get("return_offsets_mapping"):
                raise NotImplementedError
            return self.inner(text, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    assert encode_conversation(CONV, NoOffsets(tok), "llava_v1", 512) == encode_conversation(CONV, tok, "llava_v1", 512)


# --------------------------------------------------------------------------- chat


@pytest.mark.parametrize("template", [CHAT, CHAT_GEN], ids=["incremental", "generation-blocks"])
def test_chat_template_supervises_only_assistant_content(template):
    tok = load_tokenizer("world")
    tok.chat_template = template
    assert resolve_template("auto", tok) == "chat"
    enc = encode_conversation(CONV, tok, "auto", max_length=512)
    ids = enc["input_ids"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    rendered = tok.apply_chat_template([{"role": "user" if t["from"] == "human" else "assistant",
                                         "content": t["value"]} for t in CONV], tokenize=False)
    assert decoded(tok, ids) == rendered
    assert [r.strip() for r in supervised_runs(tok, enc)] == ["red" + tok.eos_token, "two objects" + tok.eos_token]
    assert tok.bos_token_id not in [t for t in enc["labels"] if t != IGNORE_INDEX]
    text = encode_conversation(TEXT_ONLY, tok, "chat", max_length=512)
    assert IMAGE_TOKEN_INDEX not in text["input_ids"]
    assert [r.strip() for r in supervised_runs(tok, text)] == ["right" + tok.eos_token]


def test_resolve_template_errors(tok, chat_tok):
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template("chat", tok)
    with pytest.raises(ValueError, match="valid: auto"):
        resolve_template("vicuna", tok)
    assert resolve_template("llava_v1", chat_tok) == "llava_v1"


def test_world_manifests_encode(world_dir, tok):
    for name, template in (("pretrain.json", "plain"), ("instruct.json", "llava_v1")):
        rows = read_manifest(str(world_dir / "train" / name)).rows
        for row in rows:
            enc = encode_row(row, tok, template, max_length=256)
            assert enc["input_ids"].count(IMAGE_TOKEN_INDEX) == (1 if row["image"] else 0)
            assert any(t != IGNORE_INDEX for t in enc["labels"])
        if template == "plain":
            assert supervised_runs(tok, encode_row(rows[0], tok, "plain", 256)) == [
                rows[0]["conversations"][1]["value"] + tok.eos_token]


def test_one_llava_v1_renderer_for_training_generation_and_eval_text(tok, tmp_path):
    """render_llava_v1 is the one LLaVA v1 rendering: the instruct stage's text, the eval
    generation prompt (the same text up to the answer) and eval's perplexity texts."""
    import json

    from sea_ray.data.templates import render_llava_v1
    from sea_ray.eval.generate import render_prompt
    from sea_ray.eval.job import split_texts

    text, spans = render_llava_v1([("<image>\nQ1?", "a1"), ("Q2?", "a2")], "</s>")
    assert text == f"{LLAVA_V1_SYSTEM} USER: <image>\nQ1? ASSISTANT: a1</s>USER: Q2? ASSISTANT: a2</s>"
    assert [text[s:e] for s, e in spans] == ["a1</s>", "a2</s>"]
    prompt, none = render_llava_v1([("<image>\nQ1?", None)])
    assert prompt == f"{LLAVA_V1_SYSTEM} USER: <image>\nQ1? ASSISTANT:" and none == []
    assert text.startswith(prompt)  # the prompt is the training text up to the answer
    assert render_prompt("Q1?", tok, "llava_v1") == prompt
    with pytest.raises(ValueError, match="last turn"):
        render_llava_v1([("Q1?", None), ("Q2?", "a2")])
    eos = tok.eos_token
    full = encode_conversation(CONV, tok, "llava_v1", max_length=512)
    rendered, _ = render_llava_v1([(CONV[0]["value"], "red"), (CONV[2]["value"], "two objects")], eos)
    ids = [t for t in full["input_ids"] if t != IMAGE_TOKEN_INDEX]
    assert tok.decode(ids) == rendered.replace("<image>", "")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "instruct.json").write_text(json.dumps([{"id": "x", "image": "x.png", "conversations": CONV}]))
    texts = split_texts(str(tmp_path), "val", [{"id": "x", "caption": "a red circle"}], eos)
    assert texts == ["a red circle" + eos, render_llava_v1([("What color is the circle?", "red"),
                                                            (CONV[2]["value"], "two objects")], eos)[0]]
