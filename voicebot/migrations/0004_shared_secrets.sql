-- Values every replica on this database must share (e.g. the caller-hash salt): created once by
-- whichever replica needs one first (INSERT ... ON CONFLICT DO NOTHING) and read back by all.
CREATE TABLE shared_secrets (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
