"""Text handling for the local-binary backend: the flattened chat prompt, and the filter
that turns raw stdout into answer text while it streams.

The filter does three things a one-shot CLI needs and none of them may delay text longer
than it must:

- strip the echoed prompt: llama-completion prints the prompt before the answer unless
  given ``--no-display-prompt``; output is held only while it still matches the prompt;
- strip the end marker llama.cpp prints on stdout at end-of-generation (" [end of text]"),
  which also tells ``stop`` (the model ended) from ``length`` (``-n`` ran out);
- apply stop sequences (the binary knows none): text is cut before the first stop string,
  holding back only as many characters as could begin one.
"""

from __future__ import annotations

from tokenhive.schemas.messages import Message
from tokenhive.workers.stops import held_suffix_len


def flatten_chat(messages: list[Message]) -> str:
    """The llama-cli convention: "System: …\\nUser: …\\nAssistant:" (role names capitalised),
    ending with an open assistant turn for the model to complete."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


class OutputFilter:
    """Feed stdout text as it arrives; get back the answer text that is safe to emit."""

    def __init__(self, prompt: str | None, end_marker: str, stops: list[str]) -> None:
        self._echo = prompt  # None once the echo question is settled
        self._marker = end_marker
        self._stops = [s for s in stops if s]
        self._held = ""  # text not yet emitted
        self.stopped = False  # a stop sequence or the end marker: emit nothing more
        self.hit_stop = False  # a stop sequence was found
        self.ended = False  # the end marker was seen

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self._held += text
        if self._echo is not None:
            if not self._settle_echo(final=False):
                return ""
        return self._release(final=False)

    def finish(self) -> str:
        """All remaining text once stdout is closed."""
        if self.stopped:
            return ""
        if self._echo is not None:
            self._settle_echo(final=True)
        return self._release(final=True)

    def _settle_echo(self, final: bool) -> bool:
        """True once we know whether the output starts with the prompt (and dropped it)."""
        prompt = self._echo or ""
        if self._held.startswith(prompt):
            self._held = self._held[len(prompt):]
        elif prompt.startswith(self._held) and not final:
            return False  # still could be the echo: keep holding
        self._echo = None
        return True

    def _release(self, final: bool) -> str:
        held = self._held
        for stop in self._stops:
            at = held.find(stop)
            if at >= 0:
                self.stopped = self.hit_stop = True
                self._held = ""
                return held[:at]
        if self._marker:
            at = held.find(self._marker)
            if at >= 0:
                self.ended = True
                self.stopped = True  # nothing after the marker is answer text
                self._held = ""
                return held[:at]
        if final:
            self._held = ""
            return held
        keep = held_suffix_len(held, [*self._stops, self._marker])
        self._held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep]
