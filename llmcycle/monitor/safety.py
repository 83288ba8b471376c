"""Safety checks on what goes into the model and what comes out, each with an action.

The serve recipe lists the checks:

```yaml
safety:
  - {check: pii, where: prompt, action: redact}              # e-mail, phone, IP, card numbers -> <EMAIL> ...
  - {check: injection, where: prompt, action: flag}          # "ignore previous instructions", ...
  - {check: harmful, where: completion, action: refuse, word_lists: [blocked.txt]}
  - {check: classifier, where: prompt, action: refuse, classifier: "mypkg.mod:score", threshold: 0.8}
```

Checks reuse the data stage's detectors: `pii` its redaction (llmcycle/data/filters/pii.py), `harmful` its
weighted word lists (data/filters/harmful.py: triggered when weighted matches per 1000 words pass
`threshold`, default 0: any match), `classifier` any "package.module:function" scoring a text in [0, 1]
(triggered at `threshold`, default 0.5); `injection` matches common prompt-injection phrasings.

Actions: `log` counts the trigger on /metrics (`llmcycle:safety_triggers_total{check, where, action}`) and in
the request-log row (`safety`); `where` is prompt, completion or both (the default; not `on`, which YAML
reads as true); `flag` does the same, marking the row flagged; `redact` (pii only) replaces
what was found before the model sees the prompt, or before the client sees a completion; `refuse` answers
a prompt with 400 (code `content_filter`) without running it, and replaces a completion's text with nothing
and its finish reason with `content_filter`, as OpenAI does. A streamed completion is checked when it ends:
its text has been sent already, so there the check can count and flag, not redact or refuse.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any

from llmcycle.errors import ConfigError

CHECKS = ("pii", "injection", "harmful", "classifier")
ACTIONS = ("log", "flag", "redact", "refuse")
WHERE = ("prompt", "completion", "both")

# Phrasings of the common direct prompt injections (instructions to drop the system prompt, to reveal it,
# role hijacks). A pattern list catches the lazy cases only; a classifier is the tool for the rest.
INJECTION = re.compile(
    r"\b(ignore|disregard|forget|override)\b[^.\n]{0,40}\b(previous|prior|above|earlier|system|all)\b[^.\n]{0,20}"
    r"\b(instructions?|prompts?|rules|directions)\b"
    r"|\b(reveal|print|show|repeat|output)\b[^.\n]{0,30}\b(system prompt|hidden prompt|your instructions)\b"
    r"|\byou are now\b[^.\n]{0,30}\b(DAN|jailbroken|unfiltered|developer mode)\b"
    r"|\benable\b[^.\n]{0,20}\bdeveloper mode\b",
    re.IGNORECASE)


@dataclasses.dataclass
class Trigger:
    check: str
    where: str  # prompt or completion
    action: str
    score: float


class SafetyRefusal(Exception):
    """A prompt check with action `refuse` fired."""


class Check:
    """One configured check: `scan(text)` gives a score when it triggers (None otherwise)."""

    def __init__(self, spec: dict[str, Any], index: int) -> None:
        where = f"safety[{index}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: give a mapping such as {{check: pii, where: prompt, action: redact}}.")
        unknown = sorted(str(k) for k in set(spec) - {"check", "where", "action", "word_lists", "threshold",
                                                      "classifier"})
        if unknown:
            hint = " (`on` reads as true in YAML: the key is `where`)" if unknown[0] == "True" else ""
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}{hint}.")
        self.check, self.where, self.action = (spec.get("check"), spec.get("where", "both"),
                                               spec.get("action", "flag"))
        for key, value, choices in (("check", self.check, CHECKS), ("where", self.where, WHERE),
                                    ("action", self.action, ACTIONS)):
            if value not in choices:
                raise ConfigError(f"{where}.{key} = {value!r}; choose among: {', '.join(choices)}.")
        if self.action == "redact" and self.check != "pii":
            raise ConfigError(f"{where}: only the pii check can redact; use flag or refuse for {self.check}.")
        self.threshold = float(spec.get("threshold", 0.5 if self.check == "classifier" else 0.0))
        self._score: Callable[[str], float]
        if self.check == "pii":
            from llmcycle.data.filters.pii import Pii

            pii = Pii()
            self.redact = lambda text: pii.redact(text)[0]
            self._score = lambda text: float(sum(pii.redact(text)[1].values()))
        elif self.check == "injection":
            self._score = lambda text: float(len(INJECTION.findall(text)))
        elif self.check == "harmful":
            from llmcycle.data.filters.harmful import Harmful, HarmfulParams

            step = Harmful(HarmfulParams(word_lists=list(spec.get("word_lists") or []), threshold=self.threshold))
            step.setup()
            self._score = step.score
        else:
            name = spec.get("classifier")
            if not isinstance(name, str) or ":" not in name:
                raise ConfigError(f"{where}.classifier: give 'package.module:function' scoring a text in [0, 1].")
            module, _, func = name.partition(":")
            try:
                self._score = getattr(importlib.import_module(module), func)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{where}.classifier: cannot load {name!r} ({e}).") from None

    def applies(self, where: str) -> bool:
        return self.where in (where, "both")

    def scan(self, text: str) -> float | None:
        score = float(self._score(text))
        triggered = score >= self.threshold if self.check == "classifier" else score > self.threshold
        return score if triggered else None


class SafetyChecks:
    """The configured checks, run on a prompt before dispatch and on a completion at the end."""

    def __init__(self, specs: list[dict] | None) -> None:
        self.checks = [Check(s, i) for i, s in enumerate(specs or [])]

    def __bool__(self) -> bool:
        return bool(self.checks)

    def on_text(self, text: str, where: str, triggers: list[Trigger], can_change: bool = True) -> str | None:
        """Run the checks for `where` (prompt or completion) over `text`, appending what fired to `triggers`;
        returns the text to use (redacted where a check redacts), None for a refused completion. Raises
        SafetyRefusal for a refused prompt. With `can_change` False (a stream already sent) checks only
        count."""
        for c in self.checks:
            if not c.applies(where):
                continue
            score = c.scan(text)
            if score is None:
                continue
            triggers.append(Trigger(c.check, where, c.action, score))
            if not can_change:
                continue
            if c.action == "redact":
                text = c.redact(text)
            elif c.action == "refuse":
                if where == "prompt":
                    raise SafetyRefusal(f"The prompt was refused by the server's {c.check} check.")
                return None
        return text
