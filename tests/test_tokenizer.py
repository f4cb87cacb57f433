"""tokenizer.py: the real Qwen vocabulary, the chat formats against transformers (ChatML; Qwen3's
thinking on and off, <think> blocks of earlier turns, against its own Jinja template), the
streaming decoder."""
import json
import os
import random
import shutil

import pytest
from conftest import hub_available, write_tiny_tokenizer
from transformers import AutoTokenizer

import tokenizer as tokmod
from tokenizer import QWEN2_SYSTEM, QWEN25_SYSTEM, StreamDecoder, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "写一首关于大海的诗 🌊"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b\n\nc"}, {"role": "user", "content": "d"}],
]

MIXED = "混合文本 with emoji 🎉👍🏽 and 中文字符！ Ünïcödé ½ — ∑ 𝔘 done."


@pytest.fixture(scope="module")
def real(real_ckpt):
    return Tokenizer(real_ckpt)


def test_real_vocabulary_ids(real):
    assert real.encode("Hello world") == [9707, 1879]
    assert real.encode(" Hello world") == [21927, 1879]
    assert real.token_id("<|endoftext|>") == 151643
    assert real.token_id("<|im_start|>") == 151644
    assert real.token_id("<|im_end|>") == 151645
    assert real.encode("<|im_start|>user") == [151644, 872]
    assert real.decode([9707, 1879]) == "Hello world"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(real, real_ckpt, messages, add_generation_prompt):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(real_ckpt)
    expected_text = hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    assert real.apply_chat_template(messages, add_generation_prompt) == expected_text
    expected_ids = hf(expected_text, add_special_tokens=False)["input_ids"]
    assert real.encode_chat(messages, add_generation_prompt) == expected_ids


def test_default_system_prompts(tmp_path):
    qwen2_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                      "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                      "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
                      "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% "
                      "endif %}")
    write_tiny_tokenizer(str(tmp_path), chat_template=qwen2_template)
    tok = Tokenizer(str(tmp_path))
    assert tok.default_system == QWEN2_SYSTEM
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    write_tiny_tokenizer(str(tmp_path))  # the conftest template is Qwen2.5's
    assert Tokenizer(str(tmp_path)).default_system == QWEN25_SYSTEM
    write_tiny_tokenizer(str(tmp_path), chat_template=None)
    assert not Tokenizer(str(tmp_path)).has_chat_template


def test_chat_template_from_jinja_file(tmp_path):
    write_tiny_tokenizer(str(tmp_path), chat_template=None)
    with open(tmp_path / "chat_template.jinja", "w") as f:
        f.write("{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                "assistant.<|im_end|>\\n' }}")
    assert Tokenizer(str(tmp_path)).default_system == QWEN25_SYSTEM


def test_bad_chat_messages(real):
    with pytest.raises(ValueError, match="role"):
        real.apply_chat_template([{"role": "robot", "content": "x"}])


def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer, skip_special_tokens=False)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    return pieces


def test_streaming_decode_is_exact(real):
    ids = real.encode(MIXED)
    pieces = stream(real, ids)
    assert "".join(pieces) == real.decode(ids) == MIXED
    assert not any("\ufffd" in p for p in pieces)
    # some characters really are split over several tokens, so holding back is exercised
    assert any(p == "" for p in pieces[:-1])


def test_streaming_decode_random_token_runs(real):
    """Any token sequence (even one that ends mid-character) streams to exactly its full decode."""
    rng = random.Random(0)
    source = real.encode(MIXED * 3)
    for _ in range(30):
        a = rng.randrange(len(source))
        ids = source[a:a + rng.randrange(1, 20)]
        assert "".join(stream(real, ids)) == real.decode(ids)


# ----------------------------------------------------------------------------------------------
# Qwen3's chat format, against transformers running Qwen3's own template
# ----------------------------------------------------------------------------------------------

# Qwen/Qwen3-0.6B's tokenizer_config.json "chat_template", verbatim (as copied into llama.cpp,
# models/templates/Qwen-Qwen3-0.6B.jinja). Test data: it runs in transformers' Jinja sandbox only.
QWEN3_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in "
    "tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if "
    "messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0].content + "
    "'<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, "
    "last_query_index=messages|length - 1) %}\n{%- for message in messages[::-1] %}\n    {%- set index = "
    "(messages|length - 1) - loop.index0 %}\n    {%- if ns.multi_step_tool and message.role == \"user\" and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) "
    "%}\n        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    "
    "{%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- "
    "endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- '\\n' "
    "}}\n                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"
)

THOUGHT = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! How can I help?"
QWEN3_CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 2?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    # an earlier assistant turn loses its <think> block
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": THOUGHT},
                   {"role": "user", "content": "Tell me a joke"}],
    # assistant turns after the last user message keep theirs (the last one always gets a block)
    "after_last_user": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": THOUGHT},
                        {"role": "assistant", "content": "<think>\n\nmore\n\n</think>\n\n\nAnd more."},
                        {"role": "assistant", "content": "No reasoning here."},
                        {"role": "assistant", "content": "Last, without reasoning."}],
    "think_without_newlines": [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "<think>x</think>y"},
                               {"role": "user", "content": "b"},
                               {"role": "assistant", "content": "<think>z</think>w"}],
    "reasoning_content": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": "answer", "reasoning_content": "\nwhy\n"}],
    "no_user": [{"role": "system", "content": "S"}, {"role": "assistant", "content": THOUGHT}],
    "late_system": [{"role": "user", "content": "a"}, {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "b"}],
    # a user turn that only carries a tool response does not count as the last query
    "tool_response": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": THOUGHT},
                      {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"},
                      {"role": "assistant", "content": THOUGHT}],
}


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """Qwen2.5's tokenizer.json (same vocabulary, less <think> as one token) with Qwen3's chat template."""
    source = os.path.join(os.path.expanduser("~"), ".cache", "qwen-testdata", "qwen2.5-coder-0.5b-instruct")
    if not os.path.isfile(os.path.join(source, "tokenizer.json")):
        pytest.skip("tokenizer test data absent: run python ../shared/tools/make_real_qwen2.py")
    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    shutil.copy(os.path.join(source, "tokenizer.json"), folder)
    with open(os.path.join(source, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = QWEN3_TEMPLATE
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizers(qwen3_folder):
    """(ours, transformers') on the same folder."""
    return Tokenizer(qwen3_folder), AutoTokenizer.from_pretrained(qwen3_folder)


def hf_render(hf, messages, add_generation_prompt, enable_thinking="absent"):
    kwargs = {} if enable_thinking == "absent" else {"enable_thinking": enable_thinking}
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                  **kwargs)


def compare(ours, hf, messages, add_generation_prompt, enable_thinking):
    want = hf_render(hf, messages, add_generation_prompt, enable_thinking)
    ours_thinking = None if enable_thinking == "absent" else enable_thinking
    got = ours.apply_chat_template(messages, add_generation_prompt, ours_thinking)
    assert got == want
    expected = hf.encode(want, add_special_tokens=False)
    assert ours.encode_chat(messages, add_generation_prompt, ours_thinking) == expected
    return got


@pytest.mark.parametrize("name", QWEN3_CONVERSATIONS)
@pytest.mark.parametrize("enable_thinking", [True, False, None, "absent"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_qwen3_matches_template(tokenizers, name, enable_thinking, add_generation_prompt):
    ours, hf = tokenizers
    assert ours.thinking and ours.default_system is None
    compare(ours, hf, QWEN3_CONVERSATIONS[name], add_generation_prompt, enable_thinking)


def test_what_the_format_looks_like(tokenizers):
    """The cases above can fail: spell out the three behaviours they pin."""
    ours = tokenizers[0]
    user = [{"role": "user", "content": "Hi"}]
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.apply_chat_template(user, True, False) == prompt + "<think>\n\n</think>\n\n"
    assert ours.apply_chat_template(user, True, True) == prompt
    text = ours.apply_chat_template(QWEN3_CONVERSATIONS["multi_turn"], True, None)
    assert "<think>" not in text and "<|im_start|>assistant\nHello! How can I help?<|im_end|>" in text
    text = ours.apply_chat_template(QWEN3_CONVERSATIONS["after_last_user"], False, None)
    assert text.count("<think>") == 3 and "<think>\n\n</think>\n\nLast, without reasoning." in text


def test_split_thinking():
    assert tokmod.split_thinking(THOUGHT) == ("The user greets me.\nI greet back.", "Hello! How can I help?")
    assert tokmod.split_thinking("plain") == ("", "plain")
    assert tokmod.split_thinking("<think>\n\n</think>\n\nA") == ("", "A")


@pytest.mark.hub
def test_hub_qwen3_tokenizer_matches_transformers():
    if not hub_available():
        pytest.skip("the Hugging Face hub is not reachable")
    ours, hf = Tokenizer.from_pretrained("Qwen/Qwen3-0.6B"), AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B")
    assert ours.thinking and ours.token_id("<think>") == 151667 and ours.token_id("</think>") == 151668
    for name, messages in QWEN3_CONVERSATIONS.items():
        for enable_thinking in (True, False, "absent"):
            compare(ours, hf, messages, True, enable_thinking)
    ids = ours.encode_chat(QWEN3_CONVERSATIONS["single"], enable_thinking=False)
    expected_end = [151644, 77091, 198, 151667, 271, 151668, 271][-5:]
    assert ids[-5:] == expected_end or (151667 in ids and 151668 in ids)
