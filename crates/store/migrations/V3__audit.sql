-- Audit events of every service, partitioned by day on the event's own timestamp. Partitions
-- are created ahead by devsync_audit_ensure_partitions and dropped whole by retention.
CREATE TABLE audit_events (
    at         timestamptz NOT NULL,
    event_id   text NOT NULL,
    device_id  text,
    worker_id  text NOT NULL,
    request_id text,
    stage      text NOT NULL,
    action     text NOT NULL,
    outcome    text NOT NULL CHECK (outcome IN ('ok', 'rejected', 'retry', 'failed', 'skipped')),
    details    jsonb NOT NULL DEFAULT '{}'::jsonb,
    trace_id   text,
    stored_at  timestamptz NOT NULL DEFAULT now(),
    -- The same event stored twice is stored once.
    PRIMARY KEY (event_id, at)
) PARTITION BY RANGE (at);

CREATE INDEX audit_events_device_at ON audit_events (device_id, at);
CREATE INDEX audit_events_worker_at ON audit_events (worker_id, at);
CREATE INDEX audit_events_request ON audit_events (request_id);
CREATE INDEX audit_events_trace ON audit_events (trace_id) WHERE trace_id IS NOT NULL;

-- Creates the daily partitions covering [from_day, from_day + days). Idempotent.
CREATE FUNCTION devsync_audit_ensure_partitions(from_day date, days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        d := from_day + i;
        part := 'audit_events_' || to_char(d, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                part, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

SELECT devsync_audit_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9);
