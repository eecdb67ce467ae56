-- Requestors cache each device's registration (registered? enabled?) so ingress costs no
-- query per message. With only a TTL, a fleet whose devices report less often than the TTL
-- paid a query per report, and a disabled device kept talking until its entry expired. Every
-- change of a registration now notifies `devsync_registry` on commit: the payload is one
-- device id, or '*' when one statement registered or deleted more than 100 devices (every
-- cached entry is to be dropped). The TTL stays as the backstop for a listener that lost its
-- connection without noticing.

-- Registrations and deletions: statement triggers (a bulk registration is one notification;
-- the transition tables already exist for the desired-state capture and the delete cascade).
CREATE FUNCTION devsync_registry_notify_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed text[];
    id text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(r.id) INTO changed FROM (SELECT n.id FROM new_rows n LIMIT 101) AS r;
    ELSE
        SELECT array_agg(r.id) INTO changed FROM (SELECT o.id FROM old_rows o LIMIT 101) AS r;
    END IF;
    IF changed IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(changed) > 100 THEN
        PERFORM pg_notify('devsync_registry', '*');
    ELSE
        FOREACH id IN ARRAY changed LOOP
            PERFORM pg_notify('devsync_registry', id);
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_registry_inserted AFTER INSERT ON devices
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devsync_registry_notify_rows();
CREATE TRIGGER devices_registry_deleted AFTER DELETE ON devices
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devsync_registry_notify_rows();

-- Enabling, disabling and renaming: a row trigger on those columns only, so the updates of
-- the hot path (reports, check-ins, desired state), which never set them, never run it.
CREATE FUNCTION devsync_registry_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('devsync_registry', NEW.id);
    IF NEW.id IS DISTINCT FROM OLD.id THEN
        PERFORM pg_notify('devsync_registry', OLD.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_registry_updated AFTER UPDATE OF enabled, id ON devices
    FOR EACH ROW WHEN (OLD.enabled IS DISTINCT FROM NEW.enabled OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION devsync_registry_notify_row();
