"""Speakable chunks from a reply with tools, for the reply stage's TTS.

``speakable(events, chunker, on_tool)`` turns a ``ToolReply``'s events into the chunks to
synthesize, in order: the model's text through the ``Chunker``; what it said before a tool call
is flushed at once (it plays while the tool runs); a ``ToolFiller`` is its own chunk; tool
activity goes to ``on_tool`` (the turn log, the page's transcript) and is never spoken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from voicebot.chunking import Chunker
from voicebot.tools.loop import ReplyEvent, ToolFiller, ToolFinished, ToolStarted


def speakable(
    events: Iterable[ReplyEvent],
    chunker: Chunker,
    on_tool: Callable[[ToolStarted | ToolFinished], None] | None = None,
) -> Iterator[str]:
    """The chunks to speak, in order, as the events arrive."""
    for event in events:
        if isinstance(event, str):
            yield from chunker.feed(event)
        elif isinstance(event, ToolFiller):
            yield from chunker.flush()
            yield event.text
        else:
            if isinstance(event, ToolStarted):
                yield from chunker.flush()
            if on_tool is not None:
                on_tool(event)
    yield from chunker.flush()
