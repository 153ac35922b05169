-- Bookings taken by the reservation tools, and the tool calls of each turn.

CREATE TABLE reservations (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    restaurant       text NOT NULL,
    name             text NOT NULL,
    date             date NOT NULL,
    time             time NOT NULL,
    party_size       integer NOT NULL CHECK (party_size > 0),
    requests         text NOT NULL DEFAULT '',
    -- The call that booked it. No foreign key: a booking outlives the pruned turn log, and
    -- the tool writes it before the (write-behind) conversation record may have arrived.
    conversation_id  uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    cancelled_at     timestamptz
);

-- One live booking per call and slot: create_reservation is idempotent on it.
CREATE UNIQUE INDEX reservations_conversation_slot_idx
    ON reservations (conversation_id, restaurant, date, time) WHERE cancelled_at IS NULL;
CREATE INDEX reservations_slot_idx
    ON reservations (restaurant, date, time) WHERE cancelled_at IS NULL;

-- [{"name", "arguments", "result", "tool_ms", "error"}, ...] in call order.
ALTER TABLE turns ADD COLUMN tool_calls jsonb NOT NULL DEFAULT '[]'::jsonb;
