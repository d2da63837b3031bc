"""Incremental detokenisation: streamed pieces concatenate to exactly the full decode,
for byte-level BPE (multi-byte characters split over tokens) and SentencePiece-style
Metaspace tokenizers (word-initial spaces), built offline in the test."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hotswap.server.engine.detokenize import IncrementalDetokenizer, StopMatcher

CORPUS = [
    "Hello world, this is a tiny corpus.",
    "Größe, naïve café — déjà vu. 日本語のテキスト。 Emoji 🙂🚀 too!",
    "The quick brown fox jumps over the lazy dog.",
] * 20
TEXT = "Hello café 日本 🙂 — the quick naïve fox!"


def _byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _metaspace_byte_fallback():
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"] + byte_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("make", [_byte_level, _metaspace_byte_fallback])
def test_streamed_text_equals_full_decode(make):
    tok = make()
    prompt = tok("Say:")["input_ids"]
    ids = tok(" " + TEXT)["input_ids"] if make is _byte_level else tok(TEXT)["input_ids"]
    full = tok.decode(prompt + ids, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    det = IncrementalDetokenizer(tok, prompt)
    pieces = [det.push(t) for t in ids] + [det.flush()]
    assert "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces), pieces
    assert sum(1 for p in pieces if p) > 5  # it really streams


def test_stop_string_across_pieces_is_cut_and_held_back():
    m = StopMatcher(["END", "\n\n"])
    out = []
    for piece in ["Hello E", "N", "x", " wor", "ld E", "N", "D tail"]:
        text, stopped = m.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello ENx world "
    assert stopped
    assert out[1] == ""  # "EN" was held back while it could start "END"


def test_no_stop_flushes_everything():
    m = StopMatcher(["###"])
    text = "".join(m.push(p)[0] for p in ["a #", "# b", " #"]) + m.flush()
    assert text == "a ## b #"
