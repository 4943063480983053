"""Prompts as users type them: validated up front (before any model is loaded), named for output files, and
understood against a model's vocabulary (spelling, plurals, synonyms; free text with its nearest classes; nonsense
refused with suggestions)."""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import re
from dataclasses import dataclass, field

from vlseg.config import DEFAULTS
from vlseg.errors import VlsegError
from vlseg.vocab.relations import side, sideless


def validate_prompts(prompts) -> list[str]:
    """Strip, drop exact duplicates, refuse an empty list or a blank prompt."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts:
        raise VlsegError("no prompt given: pass at least one, e.g. -p 'liver'")
    out = []
    for i, p in enumerate(prompts, 1):
        if not isinstance(p, str) or not p.strip():
            raise VlsegError(f"prompt {i} is blank: give a structure name such as 'liver tumor'")
        if p.strip() not in out:
            out.append(p.strip())
    return out


SLUG_MAX = 80  # characters of a prompt's file name before its suffix: far below the 255-byte limit, temporary names too


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def slug(text: str) -> str:
    """File-name form of a prompt: ``"Liver tumor"`` → ``liver_tumor``.  One longer than ``SLUG_MAX`` keeps its
    beginning and ends in a hash of the whole prompt, so prompts sharing a long beginning get different names."""
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "prompt"
    return name if len(name) <= SLUG_MAX else f"{name[:SLUG_MAX - 11].rstrip('_')}_{_digest(text)}"


def file_stems(prompts) -> dict[str, str]:
    """A distinct file name (without suffix) per prompt, at most ``SLUG_MAX`` characters: its ``slug``, or, when an
    earlier prompt has that name already ("Liver" after "liver"), the slug's beginning and the prompt's hash, then a
    counter if even that is taken (a prompt typed as another's shortened name)."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for prompt in prompts:
        stem = slug(prompt)
        if stem in taken:
            stem = f"{stem[:SLUG_MAX - 11].rstrip('_')}_{_digest(prompt)}"
        count = 2
        while stem in taken:
            stem = f"{stem[:SLUG_MAX - 1 - len(str(count))]}_{count}"
            count += 1
        stems[prompt] = stem
        taken.add(stem)
    return stems


# --------------------------------------------------------------------------------------------- reading what users type

# British → American spellings of anatomical words (the vocabulary is written in American English).
_SPELLING = {"tumour": "tumor", "tumours": "tumors", "oesophagus": "esophagus", "oesophageal": "esophageal",
             "oedema": "edema", "haemorrhage": "hemorrhage", "haematoma": "hematoma", "haemangioma": "hemangioma",
             "caecum": "cecum", "grey": "gray", "foetal": "fetal", "anaemia": "anemia", "ischaemia": "ischemia",
             "ischaemic": "ischemic", "leukaemia": "leukemia", "centre": "center", "paediatric": "pediatric",
             "haemorrhagic": "hemorrhagic", "oestrogen": "estrogen", "colour": "color", "fibre": "fiber",
             "orthopaedic": "orthopedic", "aetiology": "etiology", "haem": "hem"}
_ARTICLES = {"the", "a", "an"}


def canonical_form(text: str) -> str:
    """Lower case, punctuation other than hyphens dropped, whitespace collapsed, a leading article removed."""
    words = re.sub(r"[^\w\s-]", " ", text.lower()).split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def _singular(word: str) -> str:
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"  # arteries → artery
    if word.endswith("ae"):
        return word[:-1]  # vertebrae → vertebra
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def wording_variants(text: str) -> list[tuple[str, str]]:
    """``(form, how)`` to look up, in order: as typed, American spelling, singular, both."""
    base = canonical_form(text)
    american = " ".join(_SPELLING.get(w, w) for w in base.split())
    out = [(base, "as typed"), (american, "spelling")]
    for form, how in list(out):
        singular = " ".join(_singular(w) for w in form.split())
        out.append((singular, "plural" if how == "as typed" else "spelling, plural"))
    seen, unique = set(), []
    for form, how in out:
        if form and form not in seen:
            seen.add(form)
            unique.append((form, how))
    return unique


@dataclass
class PromptMatch:
    """How a prompt was understood. ``query`` is what the text encoder is given: the class's name when the prompt is
    one of the vocabulary's wordings of it, the prompt itself otherwise (free text, with ``nearest`` classes)."""

    prompt: str
    query: str
    vocabulary_class: str | None
    how: str  # "name", "synonym", "spelling", "plural", "spelling, plural", "close spelling of …" or "free text"
    nearest: list[tuple[str, float]] = field(default_factory=list)
    # How the embedding is made: "as typed", "class name", "synonym ensemble" or "nearest class 'x' (similarity s,
    # margin m)" (see ``_choose_embeddings``); ``ensembled``: the class whose name-and-synonym embedding is asked.
    embedding: str = "as typed"
    ensembled: str | None = None

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "understood_as": self.vocabulary_class, "how": self.how,
                "nearest_classes": [{"class": c, "similarity": round(s, 3)} for c, s in self.nearest],
                "embedding": self.embedding}


def _wordings(vocabulary) -> dict[str, str]:
    """Canonical form of each class name and synonym → class.  Held-out paraphrases are deliberately absent: they
    exist to test the text encoder on wordings it never saw, so they must reach it as typed."""
    table = {}
    for name in vocabulary.names:
        for text in [name, *vocabulary.synonyms[name]]:
            table.setdefault(canonical_form(text), name)
    return table


@functools.lru_cache(maxsize=1)
def _bundled_wordings() -> dict[str, str]:
    """``_wordings`` of vlseg's bundled vocabulary, read once per process (callers must not change it)."""
    from vlseg.vocab.vocabulary import Vocabulary

    return _wordings(Vocabulary.load("default"))


def _full_vocabulary_class(prompt: str, vocabulary) -> str | None:
    """The bundled vocabulary's class a prompt names, when the model's own vocabulary lacks it."""
    try:
        table = _bundled_wordings()
    except VlsegError:
        return None
    found = next((table[form] for form, _ in wording_variants(prompt) if form in table), None)
    return found if found is not None and found not in vocabulary.names else None


# Words and phrases that negate or exclude.  A prompt is a structure to segment: "not the liver" would be answered
# with the liver, so such prompts are refused rather than silently read without their negation.
_NEGATING_WORDS = {"not", "no", "non", "without", "except", "excepting", "excluding", "exclude", "nor", "neither",
                   "never", "minus", "sans"}
_NEGATING_PHRASES = ("other than", "apart from", "rather than", "instead of", "free of")


def negation(text: str) -> str | None:
    """The first word or phrase of ``text`` that negates or excludes ("not", "non-", "without", "isn't", "other
    than", ...), or None.  Whole words only: "nodule" and "nonsense" hold none."""
    words = re.findall(r"[a-z]+(?:'t)?", text.lower().replace("\u2019", "'"))
    joined = f" {' '.join(words)} "
    cues = [w for w in words if w in _NEGATING_WORDS or w.endswith("n't")]
    cues += [p for p in _NEGATING_PHRASES if f" {p} " in joined]
    return min(cues, key=lambda c: joined.index(f" {c} "), default=None)


def refuse_negation(prompts, vocabulary=None) -> None:
    """Refuse, in one line, prompts that negate or exclude (see ``negation``): vlseg segments what a prompt names and
    would answer "not the liver" with the liver.  A wording of a class of ``vocabulary`` or of vlseg's bundled
    vocabulary is kept as the name it is (a "non-enhancing tumor" class)."""
    known = {**_bundled_wordings(), **(_wordings(vocabulary) if vocabulary is not None else {})}
    problems = []
    for prompt in prompts:
        cue = negation(prompt)
        if cue is not None and not any(form in known for form, _ in wording_variants(prompt)):
            problems.append(f"prompt {prompt!r}: vlseg does not understand negation ({cue!r}) and would segment what "
                            f"the words name; ask for the structures you want, one prompt each")
    if problems:
        raise VlsegError(" | ".join(problems))


def class_side(vocabulary, name: str) -> str | None:
    """The one side (``vlseg.vocab.relations.side``: left, l, lt, sinister ...; "L spine" reads as left, harmless
    since a prompt's side only ever excludes classes of the other) a class's name and synonyms carry ("liver segment
    2" is "left lateral superior segment of liver"), or None (side-less, or wordings of both sides)."""
    sides = {side(text) for text in [name, *vocabulary.synonyms[name]]} - {None}
    return sides.pop() if len(sides) == 1 else None


def contradicts(prompt: str, vocabulary, name: str) -> bool:
    """Whether the prompt names one side and the class the other: a side-less prompt or class contradicts none."""
    wanted = side(prompt)
    return wanted is not None and class_side(vocabulary, name) not in (None, wanted)


def _side_refusal(m: PromptMatch, vocabulary) -> str:
    """A prompt understood as a class of the other side: the same structure on the prompt's side, if the model
    knows it, or where else it is."""
    wanted = side(m.prompt)
    twin = next((n for n in vocabulary.names if class_side(vocabulary, n) == wanted
                 and sideless(n) == sideless(m.vocabulary_class)), None)
    elsewhere = _full_vocabulary_class(m.prompt, vocabulary)
    hint = (f"did you mean {twin!r}?" if twin else f"this model knows no {wanted}-sided counterpart" +
            (f" ({elsewhere!r} is in vlseg's vocabulary, but this model was not trained on it)" if elsewhere else ""))
    return (f"prompt {m.prompt!r}: understood as {m.vocabulary_class!r}, whose side contradicts the prompt; "
            f"{hint}")


def _match(prompt: str, table: dict[str, str], vocabulary) -> PromptMatch:
    """A prompt against the vocabulary's wordings: a class name or synonym (up to case, punctuation, an article,
    British spelling or a plural), one keyboard slip away from one ("livr tumor"; a wording of the prompt's side
    before one of the other: "left kidny" is the left kidney), or free text."""
    for form, how in wording_variants(prompt):
        if form in table:
            name = table[form]
            if how == "as typed":
                how = "name" if form == canonical_form(name) else "synonym"
            return PromptMatch(prompt, name, name, how)
    typos = difflib.get_close_matches(canonical_form(prompt), list(table), n=3, cutoff=0.9)
    if typos:
        typo = next((t for t in typos if not contradicts(prompt, vocabulary, table[t])), typos[0])
        return PromptMatch(prompt, table[typo], table[typo], f"close spelling of {typo!r}")
    return PromptMatch(prompt, prompt, None, "free text")


def _nearest(free: list[PromptMatch], vocabulary, text_encoder, ensemble: bool = False) -> None:
    """Each free-text match gets its three nearest classes by embedding cosine (to the class's name, or with
    ``ensemble`` to its name-and-synonym embedding); a prompt that names a side never gets a class of the other."""
    from vlseg.models.text.ensemble import class_embeddings, unit

    names = list(vocabulary.names)
    known = class_embeddings(text_encoder, vocabulary, names, ensemble=ensemble)
    asked = unit(text_encoder.encode([m.prompt for m in free]))
    for m, row in zip(free, asked @ known.T):
        ranked = (i for i in row.argsort(descending=True).tolist() if not contradicts(m.prompt, vocabulary, names[i]))
        m.nearest = [(names[i], float(row[i])) for i in itertools.islice(ranked, 3)]


def _refusal(m: PromptMatch, vocabulary, table: dict[str, str], open_vocabulary: bool, wordy: bool) -> str:
    """Why a free-text prompt is refused, with what the user may have meant (never a class of the other side)."""
    guesses = [table[g] for g in difflib.get_close_matches(canonical_form(m.prompt), list(table), n=3, cutoff=0.6)
               if not contradicts(m.prompt, vocabulary, table[g])]
    elsewhere = _full_vocabulary_class(m.prompt, vocabulary)
    reason = ("this model knows only its vocabulary's classes" if not open_vocabulary else
              "it is not a structure name" if not wordy else
              f"every class this model knows is of the other side than {side(m.prompt)}" if not m.nearest else
              f"it matches no class this model knows (closest: {m.nearest[0][0]!r}, "
              f"similarity {m.nearest[0][1]:.2f})")
    if elsewhere:
        reason += f"; {elsewhere!r} is in vlseg's vocabulary, but this model was not trained on it"
    hint = (f"did you mean {' or '.join(repr(g) for g in dict.fromkeys(guesses))}?" if guesses else
            f"this model knows {', '.join(repr(n) for n in list(vocabulary.names)[:8])}"
            f"{' …' if len(vocabulary) > 8 else ''} (vlseg classes lists wordings)")
    return f"prompt {m.prompt!r}: {reason}; {hint}"


PROMPT_ENSEMBLES = ("none", "synonyms", "nearest")
# The thresholds of ``nearest`` (measured on the bundled MiniLM): defined with the other inference defaults.
NEAREST_MIN_SIMILARITY = DEFAULTS["inference"]["nearest_min_similarity"]
NEAREST_MARGIN = DEFAULTS["inference"]["nearest_margin"]


def ensembles(text_encoder) -> bool:
    """Whether a class's wordings can be embedded and averaged: not by a closed vocabulary (one-hot rows, a bank
    of precomputed embeddings), where every wording of a class is the same row or none at all."""
    from vlseg.models.text.bank import EmbeddingBank

    return (text_encoder is not None and getattr(text_encoder, "open_vocabulary", True)
            and not isinstance(text_encoder, EmbeddingBank))


def _choose_embeddings(matches: list[PromptMatch], mode: str, vocabulary, text_encoder,
                      nearest_min_similarity: float, nearest_margin: float) -> None:
    """Record in each match how its embedding is made (``PromptMatch.embedding``).  ``none``: a vocabulary class by
    its name, free text as typed.  ``synonyms``: a class by the mean embedding of its name and synonyms
    (``vlseg.models.text.ensemble.class_embeddings``).  ``nearest``: besides, free text whose nearest class is
    confident (similarity and margin over the next class at least the thresholds) is asked as that class."""
    can = ensembles(text_encoder)
    for m in matches:
        if m.vocabulary_class is None:
            m.embedding = "as typed"
            top = m.nearest[:2] + [("", 0.0)] * (2 - len(m.nearest[:2]))
            confident = top[0][1] >= nearest_min_similarity and top[0][1] - top[1][1] >= nearest_margin
            if mode == "nearest" and can and m.nearest and confident:
                m.vocabulary_class = m.query = m.ensembled = top[0][0]
                m.embedding = (f"nearest class {top[0][0]!r} (similarity {top[0][1]:.2f}, "
                               f"margin {top[0][1] - top[1][1]:.2f})")
        elif mode == "none":
            m.embedding = "class name"
        elif not can:
            m.embedding = "class name (a closed-vocabulary text encoder: no synonyms to ensemble)"
        elif len({m.vocabulary_class, *vocabulary.synonyms[m.vocabulary_class]}) > 1:
            m.embedding, m.ensembled = "synonym ensemble", m.vocabulary_class
        else:
            m.embedding = "class name (the class has no synonyms)"


def interpret_prompts(prompts, vocabulary, text_encoder=None, min_similarity: float = 0.3, ensemble: str = "none",
                      nearest_min_similarity: float = NEAREST_MIN_SIMILARITY,
                      nearest_margin: float = NEAREST_MARGIN) -> list[PromptMatch]:
    """Understand each prompt against a model's vocabulary; refuse, in one line with suggestions, those that cannot be
    meant as a structure.

    A prompt that is (up to case, punctuation, an article, British spelling or a plural) a class name or synonym is
    asked as that class.  Anything else is free text for the text encoder, reported with its nearest classes by
    embedding cosine; it is refused when it has no word of three letters or more, or when even its nearest class is
    less similar than ``min_similarity`` (0.3 suits the bundled MiniLM: "asdf" 0.23, "the weather today" 0.18, while
    paraphrases such as "hepar" reach 0.35), and a closed-vocabulary (one-hot) model refuses all free text.  A prompt
    that negates ("not the liver") is refused first (see ``refuse_negation``), and one that names a side is never
    answered with a class of the other side ("left kidny" understood as the right kidney is refused).  ``ensemble``
    and the ``nearest_*`` thresholds: how each prompt is embedded (see ``_choose_embeddings``)."""
    prompts = validate_prompts(prompts)
    refuse_negation(prompts, vocabulary)
    if ensemble not in PROMPT_ENSEMBLES:
        raise VlsegError(f"inference.prompt_ensemble={ensemble!r}: use {', '.join(PROMPT_ENSEMBLES)}")
    table = _wordings(vocabulary)
    matches = [_match(prompt, table, vocabulary) for prompt in prompts]
    problems = [_side_refusal(m, vocabulary) for m in matches
                if m.vocabulary_class is not None and contradicts(m.prompt, vocabulary, m.vocabulary_class)]
    free = [m for m in matches if m.how == "free text"]
    open_vocabulary = text_encoder is not None and getattr(text_encoder, "open_vocabulary", True)
    if free and open_vocabulary:
        _nearest(free, vocabulary, text_encoder, ensemble=ensemble != "none" and ensembles(text_encoder))
    for m in free:
        wordy = re.search(r"[^\W\d_]{3,}", m.prompt) is not None
        if not (open_vocabulary and wordy and m.nearest and m.nearest[0][1] >= min_similarity):
            problems.append(_refusal(m, vocabulary, table, open_vocabulary, wordy))
    if problems:
        raise VlsegError(" | ".join(problems))
    _choose_embeddings(matches, ensemble, vocabulary, text_encoder, nearest_min_similarity, nearest_margin)
    return matches
