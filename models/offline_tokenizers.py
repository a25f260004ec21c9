"""Tokenizers built entirely in memory: no files, no hub, no sentencepiece.

Two tokenizers cover the text encoders of all six tiny families:

* :func:`make_clip_tokenizer` -- byte-level CLIP BPE *without merges*: the 256 byte symbols, their
  ``</w>`` (end-of-word) forms, ``<|startoftext|>`` and ``<|endoftext|>`` (514 ids). Every string
  tokenizes (no unknown tokens). As in real CLIP, ``pad == eos == <|endoftext|>``.
* :func:`make_t5_tokenizer` -- a Unigram (SentencePiece-style) tokenizer trained in memory with
  ``tokenizers.UnigramTrainer`` on a small built-in English caption corpus, with the specials in the
  real-T5 order ``<pad>=0, </s>=1, <unk>=2`` and ``extra_ids=0``. Printable ASCII is always in the
  alphabet, so ASCII text never produces ``<unk>``. Also used as the UMT5 tokenizer for Wan.

Both are transformers 5.x ``TokenizersBackend`` classes (``CLIPTokenizer``, ``T5Tokenizer``) and
round-trip through ``save_pretrained`` / ``from_pretrained``. The T5 vocabulary is trained once per
process (cached) with the ``tokenizers`` thread pool disabled, so the ids are identical on every build.

Text encoders must take their ``vocab_size`` / ``bos`` / ``eos`` / ``pad`` ids from these tokenizers:
see :func:`clip_token_ids` and :func:`t5_token_ids`.
"""

from __future__ import annotations

import functools
import json
import os
import string

__all__ = [
    "CAPTION_CORPUS",
    "CLIP_BOS",
    "CLIP_EOS",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "clip_token_ids",
    "t5_token_ids",
    "t5_vocab",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

T5_PAD = "<pad>"
T5_EOS = "</s>"
T5_UNK = "<unk>"

T5_VOCAB_SIZE = 320  # target for the trainer; the corpus may yield slightly fewer pieces

# A small built-in caption corpus (written for this package). It only shapes which sub-word
# pieces the Unigram model keeps; any text still tokenizes (ASCII is always in the alphabet).
CAPTION_CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red chair",
    "a dog running on the beach at sunset",
    "an astronaut riding a horse on the moon",
    "a bowl of fresh fruit on a wooden table",
    "a small house in a snowy forest at night",
    "a portrait of a woman with long brown hair",
    "a man wearing a blue hat and a green coat",
    "a red car parked next to a tall building",
    "a watercolor painting of a mountain lake",
    "a cup of coffee and a book on the table",
    "two birds flying over a calm blue sea",
    "a castle on a hill under a cloudy sky",
    "a yellow flower in a glass vase by the window",
    "a city street with people walking in the rain",
    "an old train crossing a stone bridge",
    "a robot playing chess in a quiet library",
    "a bear and a rabbit having a picnic in the park",
    "a close up of a green apple with water drops",
    "a sailing boat on the ocean with white clouds",
    "a cozy kitchen with plants and warm light",
    "a cat and a dog sleeping on a soft sofa",
    "a futuristic city with flying cars and neon lights",
    "a child holding a big orange balloon",
    "a field of sunflowers under a bright summer sky",
    "a black and white photograph of an old street",
    "a pencil sketch of a lion resting in the grass",
    "a plate of pasta with tomatoes and basil",
    "a lighthouse standing on rocks during a storm",
    "a girl reading a book under a large tree",
    "a pair of red shoes on a white background",
    "a colorful parrot sitting on a branch",
    "a snowy mountain reflected in a clear lake",
    "an oil painting of ships in a harbor",
    "a teddy bear wearing a tiny crown",
    "a desert with sand dunes and a single cactus",
    "a bicycle leaning against a brick wall",
    "a fox standing in a misty autumn forest",
    "a table with a laptop, a lamp and a plant",
    "a tiger walking through tall green grass",
    "a bridge over a river in a quiet village",
    "a blue butterfly resting on a pink flower",
    "a knight in shining armor holding a sword",
    "a vase with roses next to a framed picture",
    "three ducks swimming in a small pond",
    "a pizza with cheese, mushrooms and olives",
    "a wooden cabin by a lake in the mountains",
    "a violin lying on a sheet of music",
    "a stained glass window in an old church",
    "a golden retriever catching a frisbee in the park",
    "a hot air balloon floating above green hills",
    "a dragon flying over a medieval town",
    "a bowl of ramen with an egg and green onions",
    "a street market full of fruit and vegetables",
    "an owl sitting on a branch in the moonlight",
    "a modern living room with a grey sofa",
    "a panda eating bamboo in the forest",
    "the word hello written in large letters",
    "a detailed drawing of a clock and a key",
    "a horse standing in a field at dawn",
    "a spaceship landing on a red planet",
    "high quality, detailed, sharp focus, 4k, 8k",
    "blurry, low quality, ugly, watermark, text",
    "a dancer in a white dress on a dark stage",
    "a monkey dancing to music in the jungle",
)


# --------------------------------------------------------------------------------------------- CLIP


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[tuple[int, str], ...]:
    """GPT-2 / CLIP byte -> printable unicode character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(zip(bs, (chr(c) for c in cs)))


def clip_vocab() -> dict[str, int]:
    """The 514-entry byte-level CLIP vocabulary (same ordering scheme as real CLIP's first 512 ids)."""
    chars = [c for _, c in _bytes_to_unicode()]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab


def make_clip_tokenizer(model_max_length: int = 77):
    """Byte-level CLIP tokenizer with no merges (514 ids, ``pad == eos``); every string tokenizes.

    Returns a ``transformers.CLIPTokenizer``. ``model_max_length`` must not exceed the text encoder's
    ``max_position_embeddings`` (the pipelines pad to it).
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=clip_vocab(),
        merges=[],
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=int(model_max_length),
    )


def clip_token_ids() -> dict[str, int]:
    """``vocab_size``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` for a ``CLIPTextConfig``."""
    vocab = clip_vocab()
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab[CLIP_BOS],
        "eos_token_id": vocab[CLIP_EOS],
        "pad_token_id": vocab[CLIP_EOS],
    }


# ----------------------------------------------------------------------------------------------- T5


@functools.lru_cache(maxsize=1)
def _trained_t5_vocab() -> tuple[tuple[str, float], ...]:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tok = Tokenizer(Unigram())
    # Same pre-tokenization as transformers' T5Tokenizer, so pieces carry the "▁" word marker.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"▁"})
    trainer = UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE,
        show_progress=False,
        special_tokens=[T5_PAD, T5_EOS, T5_UNK],
        unk_token=T5_UNK,
        initial_alphabet=alphabet,
        max_piece_length=12,
    )
    # EM sums run on the tokenizers thread pool; run single-threaded so the pruning (and thus the
    # vocabulary) is bit-for-bit reproducible.
    key = "TOKENIZERS_PARALLELISM"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        tok.train_from_iterator(list(CAPTION_CORPUS), trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
    model = json.loads(tok.to_str())["model"]
    trained = [(str(p), float(s)) for p, s in model["vocab"]]
    head = [p for p, _ in trained[:3]]
    if head != [T5_PAD, T5_EOS, T5_UNK]:  # pragma: no cover - guards a tokenizers behaviour change
        raise RuntimeError(f"unexpected special-token order from UnigramTrainer: {head}")
    # The trainer emits ties, and appends the alphabet characters it did not keep with scores that
    # step down in hash-map order; both vary between processes. Canonicalise: EM-scored pieces sorted
    # by (score desc, piece) with rounded scores; single characters scored below every multi-character
    # piece (the appended ones) last, in code-point order, all with one score.
    pieces = trained[3:]
    floor_multi = min(s for p, s in pieces if len(p) > 1)
    kept = [(p, round(s, 4)) for p, s in pieces if len(p) > 1 or s >= floor_multi]
    kept.sort(key=lambda ps: (-ps[1], ps[0]))
    tail = sorted(p for p, s in pieces if len(p) == 1 and s < floor_multi)
    floor = round(floor_multi - 1.0, 4)
    # Specials get score 0 as in real T5 vocabularies.
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)] + kept + [(p, floor) for p in tail]
    return tuple(vocab)


def t5_vocab() -> list[tuple[str, float]]:
    """The (piece, score) list of the in-memory T5 Unigram model (deterministic)."""
    return list(_trained_t5_vocab())


def make_t5_tokenizer(model_max_length: int = 512, vocab: list[tuple[str, float]] | None = None):
    """In-memory Unigram T5 tokenizer (``<pad>=0, </s>=1, <unk>=2``, no sentinel ids).

    Returns a ``transformers.T5Tokenizer``; also serves as the UMT5 tokenizer for Wan. The pipelines
    pass ``max_sequence_length`` explicitly, so ``model_max_length`` is only the tokenizer's default.
    ``vocab``: another (piece, score) list with the same three specials first (default :func:`t5_vocab`).
    """
    from transformers import T5Tokenizer

    return T5Tokenizer(
        vocab=t5_vocab() if vocab is None else vocab,
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=int(model_max_length),
    )


def t5_token_ids() -> dict[str, int]:
    """``vocab_size``, ``pad_token_id``, ``eos_token_id``, ``decoder_start_token_id`` for a ``T5Config``."""
    return {"vocab_size": len(_trained_t5_vocab()), "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0}
