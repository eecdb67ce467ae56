-- Audit integrity: rows are append-only (only retention drops whole partitions), and a hash
-- chain per day lets `devsyncctl audit verify` prove that nothing was altered or removed.

CREATE FUNCTION devsync_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION devsync_audit_append_only();

-- The canonical text of a row, from its stored values (so insert and verify agree).
CREATE FUNCTION devsync_audit_row_text(e audit_events) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT concat_ws(E'\x1f',
        (extract(epoch FROM e.at) * 1000000)::bigint::text,
        e.event_id, coalesce(e.device_id, ''), e.worker_id, coalesce(e.request_id, ''),
        e.stage, e.action, e.outcome, e.details::text, coalesce(e.trace_id, ''))
$$;

-- One link per (day, batch): the hash of the batch's rows and the chained hash.
CREATE TABLE audit_chain (
    day        date NOT NULL,
    seq        bigint NOT NULL,
    event_ids  text[] NOT NULL,
    batch_hash bytea NOT NULL,
    chain_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, seq)
);

-- Drops the partitions (and their chain) of days before `cutoff`. Returns how many.
CREATE FUNCTION devsync_audit_drop_before(cutoff date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    FOR part IN
        SELECT c.relname AS name, to_date(substr(c.relname, 14), 'YYYYMMDD') AS day
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'audit_events'::regclass AND c.relname ~ '^audit_events_[0-9]{8}$'
    LOOP
        IF part.day < cutoff THEN
            EXECUTE format('DROP TABLE %I', part.name);
            DELETE FROM audit_chain WHERE day = part.day;
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- A role with exactly the audit service's rights: read and append, never update or delete.
-- Grant it to the audit service's login role. Roles are shared by every database of the
-- server, so several databases migrating at once may race here; and a managed database may
-- not allow creating roles. Either way the step is skipped with a notice: the append-only
-- trigger protects the rows regardless.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'devsync_audit_writer') THEN
        CREATE ROLE devsync_audit_writer NOLOGIN;
    END IF;
    GRANT SELECT, INSERT ON audit_events, audit_chain TO devsync_audit_writer;
    REVOKE UPDATE, DELETE, TRUNCATE ON audit_events, audit_chain FROM devsync_audit_writer;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'devsync_audit_writer role not set up: %', SQLERRM;
END $$;
