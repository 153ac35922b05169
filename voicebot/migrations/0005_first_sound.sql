-- Speech end to the first agent audio of any kind (the persona's acknowledgement when it
-- played), beside v2v_ms, which always counts to the answer's first audio.
ALTER TABLE turns ADD COLUMN first_sound_ms double precision;
-- What the caller heard of the acknowledgement; assistant_text starts with it.
ALTER TABLE turns ADD COLUMN acknowledgement text NOT NULL DEFAULT '';
