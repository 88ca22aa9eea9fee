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
    # Several class prompts ("a red duck", "a green duck", ...), expanded; None: class_prompt alone.
    class_prompts: tuple[str, ...] | None = None

    @property
    def preserved_prompts(self) -> tuple[str, ...]:
        """The prompts prior preservation samples and trains on, in order."""
        return self.class_prompts if self.class_prompts is not None else (self.class_prompt,)


CLASS_PLACEHOLDER = "{class}"
_LEFTOVER_BRACES = re.compile(r"\{[^{}]*\}|[{}]")


def _bare(word: str) -> str:
    return re.sub(r"^\W+|\W+$", "", word)


def parse_instance_prompt(prompt: str, identifier: str, class_prompt: str | None = None,
                          class_prompts: list[str] | None = None) -> InstancePrompt:
    """Split "a sks duck" into identifier and class noun; the class prompt defaults to the prompt
    without its identifier ("a duck"). ``class_prompts`` replaces it with several, ``{class}``
    standing for the class noun (:func:`expand_class_prompts`). One-line errors name the fix."""
    if class_prompt is not None and class_prompts is not None:
        raise ConfigError(f"Both class_prompt={class_prompt!r} and class_prompts are set: give one, e.g. "
                          f"class_prompts: [{class_prompt!r}] (or class_prompts: null to keep class_prompt).")
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
    expanded = None if class_prompts is None else expand_class_prompts(class_prompts, identifier, class_noun)
    return InstancePrompt(prompt=prompt, identifier=identifier, class_noun=class_noun, class_prompt=class_prompt,
                          class_prompts=expanded)


def expand_class_prompts(class_prompts: list[str], identifier: str, class_noun: str) -> tuple[str, ...]:
    """``{class}`` in each prompt replaced by ``class_noun`` ("a red {class}" -> "a red duck"), so a
    recipe lists them without knowing the subject. Refuses an empty list, an empty prompt, any
    other ``{placeholder}`` (or a stray brace) and a prompt with the identifier in it."""
    if isinstance(class_prompts, str) or not class_prompts:
        raise ConfigError(f"class_prompts={class_prompts!r} must be a non-empty list of prompts, e.g. "
                          f'["a red {CLASS_PLACEHOLDER}", "a green {CLASS_PLACEHOLDER}"] (or null for class_prompt).')
    expanded = []
    for i, template in enumerate(class_prompts):
        if not isinstance(template, str) or not template.strip():
            raise ConfigError(f"class_prompts[{i}]={template!r} is empty: give each class prompt some text, "
                              f'e.g. "a red {CLASS_PLACEHOLDER}".')
        text = template.replace(CLASS_PLACEHOLDER, class_noun)
        leftover = _LEFTOVER_BRACES.search(text)
        if leftover is not None:
            raise ConfigError(f"class_prompts[{i}]={template!r} has an unknown placeholder or stray brace "
                              f"{leftover.group()!r}: the only one is {CLASS_PLACEHOLDER} (the class noun, "
                              f"{class_noun!r}).")
        if identifier.lower() in [_bare(w).lower() for w in text.split()]:
            raise ConfigError(f"class_prompts[{i}]={template!r} contains the identifier {identifier!r}: class prompts "
                              f'name the class alone (e.g. "a red {CLASS_PLACEHOLDER}").')
        expanded.append(text)
    return tuple(expanded)


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
