"""tokenizer.py: real Qwen vocabulary, chat formatting against transformers, streaming decode."""
import random

import pytest
from conftest import write_tiny_tokenizer

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
