-- Devices and their state documents: the source of truth devsync keeps devices in sync with.
CREATE TABLE devices (
    id                      text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,128}$'),
    labels                  jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    enabled                 boolean NOT NULL DEFAULT true,
    -- Webhook the fan-out calls with new desired state, if the device has one.
    http_endpoint           text CHECK (http_endpoint IS NULL OR http_endpoint ~ '^https?://'),
    desired                 jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(desired) = 'object'),
    -- Bumped by trigger whenever `desired` changes, however it is changed.
    desired_version         bigint NOT NULL DEFAULT 0 CHECK (desired_version >= 0),
    desired_changed_at      timestamptz,
    reported                jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(reported) = 'object'),
    reported_version        bigint NOT NULL DEFAULT 0 CHECK (reported_version >= 0),
    reported_at             timestamptz,
    -- The desired version the device last acknowledged as applied (convergence).
    applied_desired_version bigint NOT NULL DEFAULT 0 CHECK (applied_desired_version >= 0),
    applied_at              timestamptz,
    -- Highest device sequence number applied: a report at or below it is a duplicate.
    last_seq                bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    last_seen               timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_labels ON devices USING gin (labels jsonb_path_ops);
CREATE INDEX devices_last_seen ON devices (last_seen DESC NULLS LAST);

-- Every desired version of every device, kept for a window so a waking device that names the
-- version it applied last gets only what changed since.
CREATE TABLE desired_history (
    device_id  text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    version    bigint NOT NULL,
    desired    jsonb NOT NULL,
    source     text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, version)
);
CREATE INDEX desired_history_changed_at ON desired_history (changed_at);

-- Desired-state changes captured by trigger, relayed by the requestor to DEVSYNC_REQ. Rows are
-- read in (txid, id) order below the oldest running transaction, so a change committed late
-- with a lower id is never skipped by the relay's cursor.
CREATE TABLE desired_changes (
    id              bigserial PRIMARY KEY,
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    device_id       text NOT NULL,
    desired_version bigint NOT NULL,
    -- true when one statement changed many devices (goes to the bulk lane).
    bulk            boolean NOT NULL DEFAULT false,
    source          text NOT NULL,
    changed_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX desired_changes_order ON desired_changes (txid, id);

-- Persisted positions of relays (the requestor's outbox relay).
CREATE TABLE relay_cursors (
    name       text PRIMARY KEY,
    txid       xid8 NOT NULL DEFAULT '0'::xid8,
    last_id    bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Requests already applied, per device (idempotency for requests without a device sequence).
CREATE TABLE processed_requests (
    device_id    text NOT NULL,
    request_id   text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, request_id)
);
CREATE INDEX processed_requests_at ON processed_requests (processed_at);

-- Outputs of a transaction (pushes, audit events, follow-up stages), written in the same
-- transaction as the state change and published after commit with a deterministic message id.
-- Rows left unpublished by a crash are published by the next sweep.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    subject      text NOT NULL,
    msg_id       text NOT NULL,
    payload      bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- A change of `desired` bumps its version, whatever statement made it.
CREATE FUNCTION devsync_bump_desired_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.desired IS DISTINCT FROM OLD.desired THEN
        NEW.desired_version := OLD.desired_version + 1;
        NEW.desired_changed_at := now();
        NEW.updated_at := now();
    ELSE
        NEW.desired_version := OLD.desired_version;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER devices_bump_desired_version
    BEFORE UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION devsync_bump_desired_version();

-- Set-based capture of desired changes: one history row and one change row per device, with
-- the lane decided by the statement's size. `SET LOCAL devsync.change_source = '...'` names
-- the source (defaults to 'sql'); the relay is woken with NOTIFY.
CREATE FUNCTION devsync_capture_desired_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    captured bigint;
    src text := coalesce(nullif(current_setting('devsync.change_source', true), ''), 'sql');
BEGIN
    IF TG_OP = 'UPDATE' THEN
        WITH changed AS (
            SELECT n.id, n.desired_version AS version, n.desired
            FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE n.desired_version <> o.desired_version
        ), history AS (
            INSERT INTO desired_history (device_id, version, desired, source)
            SELECT id, version, desired, src FROM changed
        )
        INSERT INTO desired_changes (device_id, desired_version, bulk, source)
        SELECT id, version, (SELECT count(*) FROM changed) > 100, src FROM changed ORDER BY id;
    ELSE
        WITH changed AS (
            SELECT n.id, n.desired_version AS version, n.desired
            FROM new_rows n WHERE n.desired_version > 0
        ), history AS (
            INSERT INTO desired_history (device_id, version, desired, source)
            SELECT id, version, desired, src FROM changed
        )
        INSERT INTO desired_changes (device_id, desired_version, bulk, source)
        SELECT id, version, (SELECT count(*) FROM changed) > 100, src FROM changed ORDER BY id;
    END IF;
    GET DIAGNOSTICS captured = ROW_COUNT;
    IF captured > 0 THEN
        PERFORM pg_notify('devsync_desired_changes', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER devices_capture_desired_update
    AFTER UPDATE ON devices
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devsync_capture_desired_changes();

CREATE TRIGGER devices_capture_desired_insert
    AFTER INSERT ON devices
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devsync_capture_desired_changes();

-- Inserting a device with a desired document starts it at version 1.
CREATE FUNCTION devsync_initial_desired_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.desired <> '{}'::jsonb AND NEW.desired_version = 0 THEN
        NEW.desired_version := 1;
        NEW.desired_changed_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER devices_initial_desired_version
    BEFORE INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION devsync_initial_desired_version();
