"""Exercise 10, the streaming detokenizer (docs/exercises/stream_decoder.md): StreamDecoder against
tokenizer.StreamDecoder, token by token, on text whose characters span several byte-level tokens."""
import functools
import tempfile

from . import reference
from ._harness import call, fail, function, run

PAGE = "exercises/stream_decoder.md"
TEXTS = [
    "Hello world, this is ASCII only.",
    "中文字符 and emoji 🎉👍🏽, Ünïcödé ½ — ∑ done.",
    "ends in the middle of a character: 🎉",
    "special <|im_end|> tokens <|im_start|>inside",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A small byte-level BPE with Qwen's special tokens (tests/conftest.py's); non-ASCII characters
    are split over several byte tokens."""
    from conftest import write_tiny_tokenizer

    from tokenizer import Tokenizer
    folder = tempfile.mkdtemp(prefix="qwen-exercise-tokenizer-")
    write_tiny_tokenizer(folder)
    return Tokenizer(folder)


def stream(cls, tok, ids, skip, case):
    decoder = call(cls, tok, skip_special_tokens=skip,
                   case=case + ": StreamDecoder(tokenizer, skip_special_tokens)")
    pieces = [call(decoder.push, i, case=f"{case}: push(token {n})") for n, i in enumerate(ids)]
    return pieces, call(decoder.flush, case=f"{case}: flush()")


def check(impl):
    cls = function(impl, "StreamDecoder")
    tok = tiny_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        if text.startswith("ends in the middle"):
            ids = ids[:-2]  # the emoji's last two bytes never arrive
        for skip in (True, False):
            case = f"text {text[:40]!r} ({len(ids)} tokens), skip_special_tokens={skip}"
            pieces, rest = stream(cls, tok, ids, skip, case)
            want, want_rest = stream(reference.StreamDecoder, tok, ids, skip, case)
            full = tok.decode(ids, skip_special_tokens=skip)
            for n, piece in enumerate(pieces):
                if not isinstance(piece, str):
                    fail(f"{case}: push(token {n}) returned {type(piece).__name__}; "
                         "return a str (\"\" when nothing is complete)")
                if "\ufffd" in piece and "\ufffd" not in want[n]:
                    fail(f"{case}: push(token {n}) returned {piece!r}, half a character (U+FFFD): hold "
                         f"tokens back while their text ends in U+FFFD")
            if "".join(pieces) + rest != full:
                fail(f"{case}: your pieces add up to {''.join(pieces) + rest!r}, the full decode is "
                     f"{full!r}: decode the held-back tokens together, not one by one")
            for n, (piece, ref) in enumerate(zip(pieces, want)):
                if piece != ref:
                    fail(f"{case}: after token {n} you return {piece!r}, the reference {ref!r}: "
                         + ("emit text as soon as it no longer ends in U+FFFD" if len(piece) < len(ref) else
                            "you emit text before it is complete"))
            if rest != want_rest:
                fail(f"{case}: flush() returned {rest!r}, expected {want_rest!r}")


def test_stream_decoder(request):
    run(request, check, PAGE)
