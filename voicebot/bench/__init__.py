"""``voicebot bench``: voice-to-voice latency of our handler next to the FastRTC cookbook pipeline.

- ``corpus``: the utterance corpus (WAVs + ``manifest.jsonl``) and its generator;
- ``baseline``: the cookbook pipeline, ``ReplyOnPause`` with a Silero v6 pause model;
- ``runner``: both pipelines on identical inputs, interleaved, through the simulate driver;
- ``metrics`` / ``report``: word error rate, percentiles, the table, JSON and plot.
"""
