"""The instance prompt of a personalisation ("a sks duck"): identifier, class noun, class prompt.

DreamBooth (Ruiz et al. 2023) binds a subject to a rare identifier placed before its class noun,
"a [V] dog", and keeps the class itself intact with images the frozen model makes of "a dog".
The identifier must carry little meaning for the prior already: a word the tokenizer knows as a
whole (say "red" or "duck" for the toy priors) would be overwritten, and the prior would forget
it. :func:`check_identifier_is_rare` refuses those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from magic3d.config import ConfigError

# Markers tokenizers put on a word's first (or last) piece: GPT-2/byte-level BPE, SentencePiece, CLIP.
_WORD_MARKERS = ("Ġ", "▁", "</w>")


@dataclass(frozen=True)
class InstancePrompt:
    """The prompt naming the subject, and what prior preservation samples instead."""

    prompt: str  # "a sks duck"
    identifier: str  # "sks"
    class_noun: str  # "duck"
    class_prompt: str  # "a duck"


def _bare(word: str) -> str:
    return re.sub(r"^\W+|\W+$", "", word)


def parse_instance_prompt(prompt: str, identifier: str, class_prompt: str | None = None) -> InstancePrompt:
    """Split "a sks duck" into identifier and class noun; the class prompt defaults to the prompt
    without its identifier ("a duck"). One-line errors name the fix."""
    identifier = (identifier or "").strip()
    if not identifier or any(c.isspace() for c in identifier):
        raise ConfigError(f"identifier={identifier!r} must be one word (e.g. sks): the rare token that will name "
                          "the subject.")
    words = (prompt or "").split()
    bare = [_bare(w).lower() for w in words]
    if identifier.lower() not in bare:
        example = f"a {identifier} {_bare(words[-1]) if words else 'duck'}"
        raise ConfigError(f"The prompt {prompt!r} does not contain the identifier {identifier!r}: put it before the "
                          f'class noun, e.g. prompt="{example}" (DreamBooth\'s "a [V] dog").')
    at = bare.index(identifier.lower())
    if at == len(words) - 1:
        raise ConfigError(f"The prompt {prompt!r} ends with the identifier {identifier!r}: follow it with the class "
                          f'noun, e.g. prompt="{prompt} duck".')
    class_noun = _bare(words[at + 1])
    if class_prompt is None:
        class_prompt = " ".join(words[:at] + words[at + 1:])
    elif identifier.lower() in [_bare(w).lower() for w in class_prompt.split()]:
        raise ConfigError(f"class_prompt={class_prompt!r} contains the identifier {identifier!r}: the class prompt "
                          "names the class alone (e.g. \"a duck\").")
    return InstancePrompt(prompt=prompt, identifier=identifier, class_noun=class_noun, class_prompt=class_prompt)


def whole_word_token(tokenizer: Any, word: str) -> str | None:
    """The tokenizer's single token for ``word`` as a whole word (alone or after a space), if it has one."""
    for text in (word, " " + word):
        pieces = tokenizer.tokenize(text)
        if len(pieces) == 1:
            token = pieces[0]
            bare = token
            for marker in _WORD_MARKERS:
                bare = bare.replace(marker, "")
            if bare.lower() == word.lower():
                return token
    return None


def check_identifier_is_rare(tokenizer: Any, identifier: str, prior: str) -> None:
    """Refuse an identifier the prior's tokenizer already knows as a whole word."""
    token = whole_word_token(tokenizer, identifier)
    if token is not None:
        raise ConfigError(
            f"identifier={identifier!r} is already a word of the prior's tokenizer ({prior}: one token, {token!r}), "
            f"so tuning would overwrite what it means: pick a rare string such as 'sks' or 'zwx' (and the prompt "
            f"with it), or set allow_vocabulary_identifier=true if it is a rare token on purpose.")
