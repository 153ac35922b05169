"""Tools the model can call: a registry (built-ins and ``voicebot.tools`` entry points), the
per-call ``Toolset`` and the ``ToolLoop`` that runs them inside a reply."""
