"""Rewards for alignment: built-in verifiable rewards, ``module:function`` rewards and reward models on disk.

Every reward follows TRL's reward-function convention, so functions written for TRL work here unchanged:
``reward(prompts, completions, **columns) -> list[float]`` where ``columns`` holds the prompt file's other
fields (``language``, ``keyword``, ``answer``, ...) as lists aligned with ``prompts``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ExpertmixError

RewardFn = Callable[..., list[float]]

# Scripts are named by the first word of a letter's Unicode name (LATIN, CYRILLIC, CJK, HIRAGANA, ...):
# the standard library's character database covers every script, so no range table is hand-written.
JAPANESE = frozenset({"HIRAGANA", "KATAKANA", "CJK"})
_SCRIPT_LANGUAGES: dict[frozenset[str], tuple[str, ...]] = {
    frozenset({"CYRILLIC"}): ("ru", "rus", "russian", "uk", "ukr", "ukrainian", "bg", "bul", "bulgarian",
                              "sr", "srp", "serbian", "be", "bel", "belarusian", "kk", "kaz", "kazakh"),
    frozenset({"CJK"}): ("zh", "zho", "cmn", "chinese", "yue", "cantonese"),
    JAPANESE: ("ja", "jpn", "japanese"),
    frozenset({"HANGUL"}): ("ko", "kor", "korean"),
    frozenset({"GREEK"}): ("el", "ell", "greek"),
    frozenset({"ARABIC"}): ("ar", "ara", "arb", "arabic", "fa", "fas", "pes", "persian", "ur", "urd", "urdu"),
    frozenset({"HEBREW"}): ("he", "heb", "hebrew"),
    frozenset({"DEVANAGARI"}): ("hi", "hin", "hindi", "mr", "mar", "marathi", "ne", "npi", "nepali"),
    frozenset({"THAI"}): ("th", "tha", "thai"),
    frozenset({"LATIN"}): ("en", "eng", "english", "de", "deu", "german", "fr", "fra", "french", "es",
                           "spa", "spanish", "it", "ita", "italian", "pl", "pol", "polish", "pt", "por",
                           "portuguese", "nl", "nld", "dutch", "sv", "swe", "swedish", "tr", "tur", "turkish",
                           "vi", "vie", "vietnamese", "id", "ind", "indonesian", "cs", "ces", "czech", "ro",
                           "ron", "romanian"),
}
LANGUAGE_SCRIPTS = {lang: scripts for scripts, langs in _SCRIPT_LANGUAGES.items() for lang in langs}
# ISO 15924 codes, as the Aya dataset's ``script`` field gives them: a row's own script wins over its language's
# usual one (Serbian and Uzbek are written in Latin as well as Cyrillic).
SCRIPT_CODES: dict[str, frozenset[str]] = {
    "latn": frozenset({"LATIN"}), "cyrl": frozenset({"CYRILLIC"}), "grek": frozenset({"GREEK"}),
    "arab": frozenset({"ARABIC"}), "hebr": frozenset({"HEBREW"}), "deva": frozenset({"DEVANAGARI"}),
    "thai": frozenset({"THAI"}), "hang": frozenset({"HANGUL"}), "kore": frozenset({"HANGUL", "CJK"}),
    "hani": frozenset({"CJK"}), "hans": frozenset({"CJK"}), "hant": frozenset({"CJK"}), "jpan": JAPANESE,
    "beng": frozenset({"BENGALI"}), "taml": frozenset({"TAMIL"}), "telu": frozenset({"TELUGU"}),
    "geor": frozenset({"GEORGIAN"}), "armn": frozenset({"ARMENIAN"}), "ethi": frozenset({"ETHIOPIC"}),
}


def char_script(ch: str) -> str | None:
    """The script of a letter (``LATIN``, ``CYRILLIC``, ``CJK``, ``HIRAGANA``...); None for non-letters."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return None
    first = name.split()[0]
    return "KATAKANA" if first.startswith("KATAKANA") else first


def script_counts(text: str) -> Counter[str]:
    """How many letters of ``text`` belong to each script (after NFKC: half-width katakana is katakana, full-width
    Latin is Latin)."""
    return Counter(s for s in map(char_script, unicodedata.normalize("NFKC", text)) if s is not None)


def folded(text: str) -> str:
    """``text`` as keyword matching compares it: NFKC (a composed 'é' and 'e' + accent are one) and casefolded."""
    return unicodedata.normalize("NFKC", text).casefold()


def language_scripts(language: str | None, prompt: str = "") -> frozenset[str]:
    """The scripts a reply in ``language`` uses; an unknown language takes the prompt's main script."""
    if language:
        key = language.strip().lower().replace("_", "-").split("-")[0]
        if key in LANGUAGE_SCRIPTS:
            return LANGUAGE_SCRIPTS[key]
    counts = script_counts(prompt)
    if not counts:
        return frozenset({"LATIN"})
    main = counts.most_common(1)[0][0]
    if main in JAPANESE and (counts["HIRAGANA"] or counts["KATAKANA"]):
        return JAPANESE
    return frozenset({main})


def script_fraction(text: str, scripts: frozenset[str]) -> float:
    """Share of the letters of ``text`` written in ``scripts`` (0 when the text has no letters)."""
    counts = script_counts(text)
    total = sum(counts.values())
    return sum(counts[s] for s in scripts) / total if total else 0.0


def _column(columns: dict[str, Any], name: str, n: int) -> list:
    values = columns.get(name)
    return list(values) if values is not None else [None] * n


def script_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """Share of the reply's letters in the prompt's script: its ``script`` field (ISO 15924, e.g. ``Latn``) when it
    has a known one, else the script of its ``language`` (or of the prompt itself)."""
    langs = _column(columns, "language", len(prompts))
    scripts = _column(columns, "script", len(prompts))
    return [script_fraction(c, SCRIPT_CODES.get(str(sc).strip().lower()) or language_scripts(lang, p))
            for p, c, lang, sc in zip(prompts, completions, langs, scripts, strict=True)]


def keyword_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """1 when the reply repeats the prompt's ``keyword`` field (case- and normalisation-insensitive), else 0."""
    keywords = columns.get("keyword")
    if keywords is None:
        raise ExpertmixError("the keyword reward needs a 'keyword' field on every prompt")
    out = []
    for i, (c, kw) in enumerate(zip(completions, keywords, strict=True)):
        if not isinstance(kw, str) or not kw:
            raise ExpertmixError(f"prompt {i}: the keyword reward needs a non-empty 'keyword' field, "
                                 f"got {kw!r}")
        out.append(1.0 if folded(kw) in folded(c) else 0.0)
    return out


def multilingual_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """Half for replying in the prompt language's script, half for repeating its keyword (when it has one)."""
    script = script_reward(prompts, completions, **columns)
    keywords = _column(columns, "keyword", len(prompts))
    return [s if not kw else 0.5 * s + 0.5 * (1.0 if folded(str(kw)) in folded(c) else 0.0)
            for s, c, kw in zip(script, completions, keywords, strict=True)]


# The expression that ends a prompt: integers joined by + - *, on its last line (``10 - 3 - 2 =``).
_EXPR = re.compile(r"-?\d+(?:[ \t]*[-+*][ \t]*-?\d+)+[ \t]*=?[ \t]*$")
_TERM = re.compile(r"[ \t]*(-?\d+)[ \t]*([-+*]|=?[ \t]*$)")
_INT = re.compile(r"-?\d+")


def arithmetic_answer(prompt: str) -> int | None:
    """The value of the expression that ends the prompt (``12 + 30 =``, ``10 - 3 - 2 =``; ``*`` before ``+``/``-``),
    or None."""
    m = _EXPR.search(prompt.strip())
    if not m:
        return None
    numbers, ops = [], []
    for term in _TERM.finditer(m.group()):
        numbers.append(int(term.group(1)))
        if term.group(2) in ("+", "-", "*"):  # the last term ends in '=' or nothing
            ops.append(term.group(2))
    total, product = 0, numbers[0]
    sign = 1
    for op, n in zip(ops, numbers[1:], strict=True):
        if op == "*":
            product *= n
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), n
    return total + sign * product


def expected_answer(answer: object, prompt: str, i: int) -> int:
    """The integer a prompt's reply must give: its ``answer`` field (an integer, or text of one), else the value of
    the expression that ends the prompt."""
    if answer is None:
        value = arithmetic_answer(prompt)
        if value is None:
            raise ExpertmixError(f"prompt {i}: no 'answer' field and no 'a + b =' expression at its end: "
                                 f"{prompt[-40:]!r}")
        return value
    if isinstance(answer, bool) or (isinstance(answer, float) and not answer.is_integer()):
        raise ExpertmixError(f"prompt {i}: field 'answer' must be an integer, got {answer!r}")
    try:
        return int(answer.strip()) if isinstance(answer, str) else int(answer)
    except (TypeError, ValueError):
        raise ExpertmixError(f"prompt {i}: field 'answer' must be an integer, got {answer!r}") from None


def arithmetic_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """1 for the right number first in the reply; a wrong number earns up to 0.5 by closeness; none earns 0.

    The expected value is the prompt's ``answer`` field, or the ``a OP b =`` expression that ends the prompt.
    The partial credit gives a small model a gradient before it gets sums exactly right.
    """
    answers = _column(columns, "answer", len(prompts))
    out = []
    for i, (p, c, ans) in enumerate(zip(prompts, completions, answers, strict=True)):
        expected = expected_answer(ans, p, i)
        m = _INT.search(c)
        if m is None:
            out.append(0.0)
        elif int(m.group()) == expected:
            out.append(1.0)
        else:
            out.append(0.5 * max(0.0, 1.0 - abs(int(m.group()) - expected) / max(abs(expected), 1)))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "script": script_reward,
    "keyword": keyword_reward,
    "multilingual": multilingual_reward,
    "arithmetic": arithmetic_reward,
}


class RewardModel:
    """A sequence-classification model on disk scoring ``prompt + completion`` (one logit = the reward)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ExpertmixError(f"{self.path}/config.json: a reward model has num_labels 1, "
                                 f"got {self.model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classifier reads the last non-padding token, found through the config's pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.__name__ = self.path.name

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=False).to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def _import_function(spec: str) -> RewardFn:
    """``package.module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ExpertmixError(f"reward {spec!r}: no such file {path}")
        mod_name = f"_expertmix_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: a syntax error, a missing import, a failing top level
            sys.modules.pop(mod_name, None)
            where = f" line {exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
            raise ExpertmixError(f"reward {spec!r}: {path}{where} does not load: {type(exc).__name__}: "
                                 f"{getattr(exc, 'msg', None) or exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # ImportError, or an error in the module's own top level
            raise ExpertmixError(f"reward {spec!r}: cannot import module {target!r} ({type(exc).__name__}: "
                                 f"{exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ExpertmixError(f"reward {spec!r}: module {target!r} has no function {name!r}")
    return fn


def load_reward(spec: str | RewardFn, device: str | torch.device = "cpu") -> RewardFn:
    """A reward from a spec: a built-in name, ``module:function``, ``file.py:function`` or a model folder."""
    if callable(spec):
        return spec
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ExpertmixError(f"reward {spec!r}: folder has no config.json (expected a "
                                 f"sequence-classification reward model)")
        return RewardModel(spec, device=device)
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        return _import_function(spec)
    raise ExpertmixError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN_REWARDS)}, "
                         f"module:function, file.py:function or a reward-model folder")


def score(reward: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          columns: dict[str, list] | None = None) -> list[float]:
    """Call ``reward`` and check that it returned one finite number per completion."""
    name = getattr(reward, "__name__", type(reward).__name__)
    try:
        values = reward(list(prompts), list(completions), **(columns or {}))
    except ExpertmixError:
        raise
    except Exception as exc:  # the user's code: one clear line, the traceback chained for --debugging
        raise ExpertmixError(f"reward {name} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ExpertmixError(f"reward {name} returned {type(values).__name__} {values!r:.60}, not a list: a reward "
                             f"takes lists (prompts, completions, **columns) and returns one score per completion "
                             f"(TRL's reward-function convention)")
    if len(values) != len(completions):
        raise ExpertmixError(f"reward {name} returned {len(values)} scores for "
                             f"{len(completions)} completions")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError) as exc:
            raise ExpertmixError(f"reward {name}: score {i} is not a number: {v!r}") from exc
        if f != f or f in (float("inf"), float("-inf")):
            raise ExpertmixError(f"reward {name}: score {i} is not finite: {v!r}")
        out.append(f)
    return out
