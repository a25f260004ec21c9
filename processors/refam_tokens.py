"""RefAM token bookkeeping: which text token is content, stop word, magnet, caption, BOS/EOS or padding.

The prompt fed to the text encoder is built from the referring expression (optionally after a caption) with
"attention magnets" appended (stop words that soak up surplus attention and are filtered out before
aggregation). Token categories come from the tokenizer's character offsets, so they follow whatever the
tokenizer does with sub-word pieces: a word's map is later the mean (or max) of its pieces' maps.

Categories (every token index has exactly one):
  content  pieces of the expression's non-stop words (spatial words such as "left" stay content)
  stop     pieces of the expression's stop words and punctuation
  magnet   appended magnet tokens (after the expression, before EOS)
  aux      appended auxiliary tokens for `gas_mode="redirect"` (after the magnets)
  caption  pieces of the caption (`caption_mode="caption+expr"`)
  bos, eos, pad
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

CATEGORIES = ("content", "stop", "magnet", "aux", "caption", "bos", "eos", "pad")
#: categories whose columns the recorder keeps (the text keys that are real words of the prompt)
WORD_CATEGORIES = ("content", "stop", "magnet", "aux", "caption")
CAPTION_MODES = ("expr", "caption+expr")

#: words that stay content even though general stop-word lists contain some of them (RefCOCO leans on them)
SPATIAL_WORDS = frozenset(
    "left right top bottom front behind middle center centre near far above below first second third last "
    "upper lower over under beside between next up down".split())

#: roughly NLTK's English stop words, minus `SPATIAL_WORDS`
STOPWORDS_EN = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until while of at by for with
about against into through during before after to from in out on off again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s t can
will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn needn
shan shouldn wasn weren won wouldn
""".split()) - SPATIAL_WORDS

#: the proposed default magnets (RefAM's exact list is not published; see docs/refam.md)
DEFAULT_MAGNETS = ("a", "the", "of", "and", "with", ",", ".")
MAGNET_COLOR = "white"

LANGUAGES = {"en": (STOPWORDS_EN, DEFAULT_MAGNETS)}

_WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # character span in the prompt
    end: int
    segment: str  # "caption" | "expression" | "magnet" | "aux"
    stop: bool = False


@dataclass(frozen=True)
class Prompt:
    """The text given to the encoder and the words in it, in order."""

    text: str
    words: tuple[Word, ...]
    expression: str


def build_prompt(expression: str, caption: str = "", caption_mode: str = "expr",
                 magnets: Sequence[str] = DEFAULT_MAGNETS, n_aux: int = 0, aux_token: str = ".",
                 stopwords: Optional[Iterable[str]] = None) -> Prompt:
    """The encoder prompt: [caption ". "] expression [magnets] [aux tokens], with every word tagged.

    `stopwords`: the language's stop words (default English, `STOPWORDS_EN`); punctuation is always a stop."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("RefAM expression is empty; give the words that describe the object, e.g. 'the red "
                         "circle on the left'")
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}; got {caption_mode!r}")
    if int(n_aux) < 0:
        raise ValueError(f"n_aux must be >= 0; got {n_aux}")
    stop = STOPWORDS_EN if stopwords is None else frozenset(w.lower() for w in stopwords)
    parts: list[tuple[str, str]] = []
    if caption_mode == "caption+expr" and caption.strip():
        parts.append(("caption", caption.strip().rstrip(".") + "."))
    parts.append(("expression", expression.strip()))
    parts += [("magnet", m) for m in magnets if m.strip()]
    parts += [("aux", aux_token)] * int(n_aux)
    text, words = "", []
    for segment, piece in parts:
        start = len(text) + (1 if text else 0)
        text = f"{text} {piece}" if text else piece
        for m in _WORD.finditer(piece):
            w = m.group(0)
            is_stop = segment == "expression" and (w.lower() in stop or not w[0].isalnum())
            words.append(Word(w, start + m.start(), start + m.end(), segment, is_stop))
    return Prompt(text, tuple(words), expression.strip())


@dataclass(frozen=True)
class TokenSets:
    """Categories of one tokenized text segment. Indices are positions in the model's text span: this
    segment starts at `offset` there (SD3: CLIP at 0, T5 at 77)."""

    categories: tuple[str, ...]
    word_of: tuple[Optional[int], ...]  # token -> index into `words` (None for specials)
    words: tuple[Word, ...]
    offset: int = 0
    pieces: tuple[str, ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        return len(self.categories)

    def indices(self, *categories: str) -> list[int]:
        """Text-span positions of the tokens in `categories`."""
        return [self.offset + i for i, c in enumerate(self.categories) if c in categories]

    @property
    def columns(self) -> list[int]:
        """The text-span positions a recorder keeps: every token of a prompt word (no BOS/EOS/pad)."""
        return self.indices(*WORD_CATEGORIES)

    def word_tokens(self, *categories: str) -> list[tuple[str, list[int]]]:
        """(word, its token positions) for the words whose tokens are in `categories`, in prompt order."""
        found: dict[int, list[int]] = {}
        for i, (c, w) in enumerate(zip(self.categories, self.word_of)):
            if c in categories and w is not None:
                found.setdefault(w, []).append(self.offset + i)
        return [(self.words[w].text, found[w]) for w in sorted(found)]


def token_sets(tokenizer, prompt: Prompt, max_length: int, offset: int = 0) -> TokenSets:
    """Categorise the tokens the pipeline's tokenizer makes of `prompt` (padding to `max_length`, as the
    pipelines do), from the tokenizer's character offsets. Raises if the expression does not fit."""
    try:
        enc = tokenizer(prompt.text, padding="max_length", max_length=int(max_length), truncation=True,
                        return_offsets_mapping=True, return_attention_mask=True)
    except NotImplementedError:
        raise ValueError(f"RefAM needs a fast tokenizer with character offsets; {type(tokenizer).__name__} has "
                         "none (load the pipeline with its *TokenizerFast)") from None
    ids, offsets, attention = enc["input_ids"], enc["offset_mapping"], enc["attention_mask"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", ()))
    words = prompt.words
    categories, word_of = [], []
    seen_eos = False
    for i, (tid, (s, e), att) in enumerate(zip(ids, offsets, attention)):
        if not att:
            categories.append("pad"), word_of.append(None)
            continue
        if tid in special and s == e:
            if tid == bos and i == 0 and not seen_eos and bos != eos:
                cat = "bos"
            elif tid == eos and not seen_eos:
                cat, seen_eos = "eos", True
            else:
                cat = "pad"
            categories.append(cat), word_of.append(None)
            continue
        w = _word_at(words, s, e)
        word_of.append(w)
        if w is None:
            categories.append("stop")  # a piece between words (stray whitespace marker): never content
            continue
        seg = words[w].segment
        categories.append({"caption": "caption", "magnet": "magnet", "aux": "aux"}.get(
            seg, "stop" if words[w].stop else "content"))
    last_expression = max((i for i, w in enumerate(words) if w.segment == "expression"), default=None)
    if last_expression is not None and last_expression not in word_of:
        raise ValueError(f"the RefAM prompt does not fit the text encoder's {max_length} tokens (the expression is cut "
                         f"off); shorten the caption or the expression, or use fewer magnets: {prompt.text!r}")
    pieces = tuple(tokenizer.convert_ids_to_tokens(ids)) if hasattr(tokenizer, "convert_ids_to_tokens") else ()
    return TokenSets(tuple(categories), tuple(word_of), words, int(offset), pieces)


def _word_at(words: Sequence[Word], start: int, end: int) -> Optional[int]:
    """The word a piece with character span [start, end) belongs to: the one it overlaps, else (a bare
    word-start marker) the next word."""
    for i, w in enumerate(words):
        if w.start < max(end, start + 1) and start < w.end:
            return i
    for i, w in enumerate(words):
        if w.start >= start:
            return i
    return None


def token_sets_from_pieces(pieces: Sequence[Optional[str]], specials: Sequence[Optional[str]], prompt: Prompt,
                           offset: int = 0) -> TokenSets:
    """Token categories when only the token *pieces* are known (ComfyUI's tokenizers give ids, no offsets):
    `pieces[i]` is the i-th token's vocabulary string, `specials[i]` one of "bos"/"eos"/"pad" (None for text
    tokens). Pieces are aligned to the prompt's characters left to right (SentencePiece "▁" and CLIP "</w>"
    markers removed, case-insensitive); a piece that does not match the text is an error."""
    text = prompt.text.lower()
    cursor, categories, word_of = 0, [], []
    for i, (piece, special) in enumerate(zip(pieces, specials)):
        if special is not None:
            categories.append(special), word_of.append(None)
            continue
        clean = (piece or "").replace("▁", " ").replace("</w>", "").strip().lower()
        while cursor < len(text) and text[cursor].isspace():
            cursor += 1
        if not clean:
            start = end = cursor
        else:
            if not text.startswith(clean, cursor):
                raise ValueError(f"cannot align token {i} ({piece!r}) with the prompt at {text[cursor:cursor + 20]!r}: "
                                 "the text encoder's tokenizer changed the text (weights syntax, embeddings?)")
            start, end = cursor, cursor + len(clean)
            cursor = end
        w = _word_at(prompt.words, start, end)
        word_of.append(w)
        seg = prompt.words[w].segment if w is not None else None
        categories.append("stop" if w is None else {"caption": "caption", "magnet": "magnet", "aux": "aux"}.get(
            seg, "stop" if prompt.words[w].stop else "content"))
    last = max((i for i, w in enumerate(prompt.words) if w.segment == "expression"), default=None)
    if last is not None and last not in word_of:
        raise ValueError(f"the RefAM prompt is cut off by the text encoder ({len(pieces)} tokens): {prompt.text!r}")
    return TokenSets(tuple(categories), tuple(word_of), prompt.words, int(offset), tuple(p or "" for p in pieces))
