"""data.chat.render equals transformers' apply_chat_template (ids and assistant mask) for
Hugging Face directories built here (no network), and the built-in templates on lmlab's BPE."""

import json
import pydoc_data.topics

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from data.chat import BUILTIN_SPECIAL_TOKENS, BUILTIN_TEMPLATES, render
from data.tokenizer import ByteLevelBPE, load_tokenizer
from data.tokenizer.hf_json import export_bpe

TEXT = "\n".join(list(pydoc_data.topics.topics.values())[:40])
SPECIALS = ["<|endoftext|>", *BUILTIN_SPECIAL_TOKENS["chatml"], *BUILTIN_SPECIAL_TOKENS["llama3"]]

# A Llama-3-style template written the way Hub templates are: multi-line, whitespace control,
# a namespace, loop controls and raise_exception.
LLAMA3_STYLE = """{{- bos_token }}
{%- set ns = namespace(seen_system=false) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.seen_system %}{{ raise_exception('only one system message') }}{% endif %}
        {%- set ns.seen_system = true %}
    {%- endif %}
    {%- if message['role'] == 'tool' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
NO_GENERATION_TAGS = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"

CONVERSATIONS = [
    [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A mutable sequence."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo wörld 🙂, ça va?"},
     {"role": "assistant", "content": " Très bien!  \n"}, {"role": "user", "content": "日本語で?"},
     {"role": "assistant", "content": "元気です。"}],
    [{"role": "user", "content": "say <|im_end|> and <|eot_id|>"}, {"role": "assistant", "content": "<|im_end|>"}],
    [{"role": "user", "content": "  spaces\tand\n\nnewlines  "}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "def f(x):\n    return x ** 2\n"}],
    [{"role": "user", "content": "tool?"}, {"role": "tool", "content": "skipped"},
     {"role": "assistant", "content": "ok", "name": None}],
]


def _train_hf_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)  # trimmed offsets: the mask must follow them
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def _write_dir(directory, tokenizer_json: tokenizers.Tokenizer | None, config: dict, jinja_file: str = ""):
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        tokenizer_json.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if jinja_file:
        (directory / "chat_template.jinja").write_text(jinja_file)
    return directory


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root, tok = tmp_path_factory.mktemp("chat"), _train_hf_bpe()
    return {
        "chatml": _write_dir(root / "chatml", tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                    "chat_template": BUILTIN_TEMPLATES["chatml"]}),
        # The template in chat_template.jinja, which transformers reads before tokenizer_config.json's.
        "llama3": _write_dir(root / "llama3", tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                    "chat_template": "{{ 'shadowed' }}"}, jinja_file=LLAMA3_STYLE),
        "untagged": _write_dir(root / "untagged", tok, {"eos_token": "<|endoftext|>",
                                                        "chat_template": NO_GENERATION_TAGS}),
    }


def _transformers_render(directory, messages, add_generation_prompt=False, template=None):
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 add_generation_prompt=add_generation_prompt, chat_template=template)
    plain = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                   chat_template=template)
    assert plain["input_ids"] == out["input_ids"]
    return out["input_ids"], out["assistant_masks"]


@pytest.mark.parametrize("name", ["chatml", "llama3", "untagged"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers_for_hf_directories(hf_dirs, name, add_generation_prompt):
    tokenizer = load_tokenizer(hf_dirs[name])
    for messages in CONVERSATIONS:
        ids, mask = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
        expected_ids, expected_mask = _transformers_render(hf_dirs[name], messages, add_generation_prompt)
        assert ids == expected_ids, messages
        assert mask == expected_mask, messages
        if name != "untagged" and any(m["role"] == "assistant" and m["content"] for m in messages):
            assert 0 < sum(mask) < len(mask)


def test_assistant_mask_marks_exactly_the_assistant_text(hf_dirs):
    """Decoding the masked tokens gives the assistant contents, each with its end-of-turn token."""
    tokenizer = load_tokenizer(hf_dirs["chatml"])
    messages = CONVERSATIONS[1]
    ids, mask = render(tokenizer, messages)
    runs, current = [], []
    for token_id, bit in zip([*ids, -1], [*mask, 0]):
        if bit:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def lmlab_bpe_dir(tmp_path_factory):
    """lmlab's own BPE with the built-in templates' special tokens, exported to a directory
    transformers loads (the reference for the BPE's encoding of rendered templates)."""
    bpe = ByteLevelBPE.train(TEXT, 600, special_tokens=SPECIALS)
    directory = tmp_path_factory.mktemp("lmlab_bpe")
    export_bpe(bpe, directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **bpe.special_tokens_map}))
    return bpe, directory


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_builtin_templates_on_lmlab_bpe_equal_transformers(lmlab_bpe_dir, template):
    bpe, directory = lmlab_bpe_dir
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            got = render(bpe, messages, add_generation_prompt, template=template)
            assert got == _transformers_render(directory, messages, add_generation_prompt,
                                               BUILTIN_TEMPLATES[template]), messages
    ids, mask = render(bpe, CONVERSATIONS[0], template=template)
    end_of_turn = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert bpe.decode([i for i, m in zip(ids, mask) if m]) == "A mutable sequence." + end_of_turn


def test_bpe_without_template_tokens_encodes_markers_as_text():
    bpe = ByteLevelBPE.train(TEXT, 400)  # only <|endoftext|>
    ids, mask = render(bpe, CONVERSATIONS[0], template="chatml")
    assert bpe.decode(ids).startswith("<|im_start|>user\nWhat is a list?<|im_end|>")
    assert bpe.decode([i for i, m in zip(ids, mask) if m]) == "A mutable sequence.<|im_end|>"


def test_saved_hf_tokenizer_keeps_its_chat_template(hf_dirs, tmp_path):
    tokenizer = load_tokenizer(hf_dirs["llama3"])
    tokenizer.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.chat_template == LLAMA3_STYLE
    assert reloaded.special_tokens_map == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert render(reloaded, CONVERSATIONS[1]) == render(tokenizer, CONVERSATIONS[1])


@pytest.mark.parametrize("template, messages, message", [
    ("{% for m in messages %}{{ m.content }", CONVERSATIONS[0], "not valid Jinja"),
    (LLAMA3_STYLE, [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}],
     "only one system message"),
    ("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", CONVERSATIONS[0], "failed to render"),
    ("chatml", [], "non-empty list"),
    ("chatml", [{"content": "no role"}], "string 'role'"),
])
def test_bad_templates_and_messages_are_one_line_value_errors(hf_dirs, template, messages, message):
    with pytest.raises(ValueError, match=message) as info:
        render(load_tokenizer(hf_dirs["chatml"]), messages, template=template)
    assert "\n" not in str(info.value)


def test_no_template_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="template='chatml'"):
        render(ByteLevelBPE.train(TEXT, 300), CONVERSATIONS[0])
