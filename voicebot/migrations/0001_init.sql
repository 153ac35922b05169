-- Conversations and their turns, as they were actually played.
-- Applied once by voicebot.migrations.migrate() inside a transaction under an advisory lock.

CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    -- persona and channel are NULL only while a turn arrived before its conversation record
    -- (write-behind replays are not ordered); the conversation record fills them in.
    persona     text,
    channel     text CHECK (channel IN ('web', 'phone', 'api', 'simulate')),
    caller_ref  text,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX conversations_started_at_idx ON conversations (started_at);

CREATE TABLE turns (
    id               uuid PRIMARY KEY,  -- the stable turn id: inserts are idempotent on it
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq              integer NOT NULL,
    user_text        text NOT NULL,
    assistant_text   text NOT NULL DEFAULT '',
    interrupted      boolean NOT NULL DEFAULT false,
    error            text,
    -- timings in milliseconds, NULL when the stage did not run
    endpoint_ms      double precision,
    stt_ms           double precision,
    llm_ttft_ms      double precision,
    tts_first_ms     double precision,
    v2v_ms           double precision,
    bargein_stop_ms  double precision,
    stt_model        text,
    llm_model        text,
    tts_model        text,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX turns_conversation_seq_idx ON turns (conversation_id, seq);
CREATE INDEX turns_created_at_idx ON turns (created_at);
