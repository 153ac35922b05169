-- Time from the LLM request to its first speakable chunk: what TTS actually waits for.
ALTER TABLE turns ADD COLUMN llm_first_chunk_ms double precision;
