"""Oracles for tests and harnesses: one that counts what is asked of a real oracle, one that answers from a script."""

from __future__ import annotations


class CountingOracle:
    """Wraps a real oracle and counts what is asked of it (the proof of 'zero oracle calls')."""

    def __init__(self, inner):
        self.inner = inner
        self.identity = inner.identity
        self.calls = 0
        self.prompts: list = []
        self.sizes: list[int] = []  # prompts per call

    @property
    def tokens_generated(self) -> int:
        return self.inner.tokens_generated

    def generate(self, conversations, settings):
        self.calls += 1
        self.prompts.extend(conversations)
        self.sizes.append(len(conversations))
        return self.inner.generate(conversations, settings)

    def close(self) -> None:
        pass


class ScriptedOracle:
    """Fault injection only: returns texts produced by ``script(conversation) -> str`` (or a ``Generation``)."""

    identity = "scripted"

    def __init__(self, script):
        self.script = script
        self.calls = 0
        self.tokens_generated = 0

    def generate(self, conversations, settings):
        self.calls += 1
        return [self.script(c) for c in conversations]

    def close(self) -> None:
        pass
