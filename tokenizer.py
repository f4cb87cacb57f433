"""Qwen's tokenizer: byte-level BPE from tokenizer.json, ChatML chat formatting, streaming decode.

All Qwen checkpoints (Qwen1.5 ... Qwen3) share one vocabulary of byte-level BPE tokens plus special
tokens; no BOS token is prepended. The special tokens that matter here:

    <|endoftext|> 151643   end of a document (base models stop here; also the padding token)
    <|im_start|>  151644   opens a chat turn:  <|im_start|>{role}\\n{content}<|im_end|>\\n
    <|im_end|>    151645   closes a chat turn (chat models stop here)
    <think> 151667, </think> 151668   Qwen3's reasoning block

The chat format (ChatML) is written out in plain Python below, not run through a template engine;
`tests/test_tokenizer.py` checks it against transformers' `apply_chat_template` with the
checkpoint's own Jinja template.
"""
from __future__ import annotations

import json
import os

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Default system prompts, recognised in the checkpoint's chat template.
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_SYSTEM = "You are a helpful assistant."


class Tokenizer:
    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer  # the Rust BPE implementation

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self.folder = folder  # the checkpoint folder it was read from
        self.bpe = HFTokenizer.from_file(path)
        config = read_json(os.path.join(folder, "tokenizer_config.json"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja) as f:
                template = f.read()
        self.chat_template = template  # kept to detect the flavour; never executed
        # Which ChatML flavour the template writes.
        self.thinking = bool(template) and THINK_OPEN in template and "enable_thinking" in template  # Qwen3
        if not template or IM_START not in template:
            self.default_system = None
        elif QWEN25_SYSTEM in template:
            self.default_system = QWEN25_SYSTEM
        elif QWEN2_SYSTEM in template and not self.thinking:
            self.default_system = QWEN2_SYSTEM
        else:
            self.default_system = None

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        """A local folder or a hub id (see resolve_checkpoint)."""
        return cls(resolve_checkpoint(name_or_path))

    # -- ids <-> text ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text to token ids; special tokens written in the text (e.g. "<|im_end|>") become their ids."""
        return self.bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.bpe.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.bpe.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.bpe.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template) and IM_START in self.chat_template

    # -- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None) -> str:
        """Render a conversation in ChatML, as the checkpoint's own template does.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]
        enable_thinking (Qwen3 only): False appends an empty <think></think> block after the
        generation prompt so the model answers directly; None/True lets the model think.
        """
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"chat messages need a role of system/user/assistant and string "
                                 f"content: {m!r}")
        if self.thinking:
            return render_qwen3(messages, add_generation_prompt, enable_thinking)
        return render_chatml(messages, self.default_system, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, enable_thinking))


def turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render_chatml(messages, default_system, add_generation_prompt) -> str:
    """Qwen1.5 / Qwen2 / Qwen2.5: a system turn first (the default one if the caller gives none),
    then every turn as <|im_start|>role\\ncontent<|im_end|>\\n."""
    text = ""
    if (not messages or messages[0]["role"] != "system") and default_system is not None:
        text += turn("system", default_system)
    for m in messages:
        text += turn(m["role"], m["content"])
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def split_thinking(content: str) -> tuple[str, str]:
    """An assistant message "<think>\\nreasoning\\n</think>\\n\\nanswer" -> (reasoning, answer), cut as
    Qwen3's template cuts it: reasoning = before the last </think>, after the last <think>; answer =
    after the last </think>, leading newlines dropped. No </think>: ("", content)."""
    if THINK_CLOSE not in content:
        return "", content
    reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, content.split(THINK_CLOSE)[-1].lstrip("\n")


def render_qwen3(messages, add_generation_prompt, enable_thinking) -> str:
    """Qwen3's chat template, written out (checked token for token in tests/test_tokenizer.py).

    No default system prompt. The last "query" is the last user message that is not just a
    <tool_response>. Assistant turns up to it lose their <think> block; later ones keep it,
    re-spaced as "<think>\\nreasoning\\n</think>\\n\\nanswer" (the final message always gets one,
    empty if need be). A message's "reasoning_content" field, when a string, is its reasoning and
    its content is then taken whole. enable_thinking=False pre-fills an empty think block after
    the generation prompt so the model answers directly; True/None let the model open its own."""
    def is_query(m):  # a user message that is not just a tool's answer
        return m["role"] == "user" and not (m["content"].startswith("<tool_response>")
                                             and m["content"].endswith("</tool_response>"))

    last_query = next((i for i in reversed(range(len(messages))) if is_query(messages[i])), len(messages) - 1)
    text = ""
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "assistant":
            if isinstance(m.get("reasoning_content"), str):
                reasoning = m["reasoning_content"]
            else:
                reasoning, content = split_thinking(content)
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"
        text += turn(role, content)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
        if enable_thinking is False:
            text += f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
    return text


class StreamDecoder:
    """Turn token ids into text as they arrive, never showing half a character.

    Byte-level BPE can split one UTF-8 character (a Chinese character, an emoji) over several
    tokens; decoding such a prefix yields the replacement character U+FFFD. We hold tokens back
    until their text is complete, so the concatenated pieces equal the full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # ids[:start] have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is now complete (possibly "")."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""  # an unfinished character: wait for more bytes
        self.start = len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD, as the full decode does)."""
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=self.skip)
        self.start = len(self.ids)
        return text


# The checkpoint folder, for the tokenizer and for checkpoint.py (generate.py's and the add-ons' reader):
# one clear line for every way a name can fail. The model files' loaders have a shorter one of their own.
def resolve_checkpoint(name_or_path: str) -> str:
    """A local folder, or a hub id downloaded (json and safetensors only) into the hub cache."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{name_or_path} is a file; pass the checkpoint folder that holds config.json")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {name_or_path} does not exist (nor is it a hub id like "
                                f"Qwen/Qwen2.5-0.5B-Instruct)")
    from huggingface_hub import errors, snapshot_download
    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    except errors.GatedRepoError:
        raise ValueError(f"{name_or_path} is gated on the hub: accept its license and log in "
                         f"(huggingface-cli login)") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        raise FileNotFoundError(f"{name_or_path} is neither a local folder nor a model on the Hugging Face "
                                f"hub") from None
    except errors.LocalEntryNotFoundError:
        raise FileNotFoundError(f"cannot reach the Hugging Face hub and {name_or_path} is not in the local "
                                f"cache; connect once or pass a local folder") from None
    except OSError as e:  # network errors surface as OSError subclasses
        raise FileNotFoundError(f"could not download {name_or_path}: {e}") from None


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
