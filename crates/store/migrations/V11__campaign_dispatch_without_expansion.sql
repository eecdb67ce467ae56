-- Campaigns are dispatched straight from the selector: the driver walks the targeted devices
-- in id order, wave by wave, active devices in a first pass and the rest in a second, and
-- creates each device's `campaign_devices` row when it dispatches it (status `sent`, with the
-- version it got). Before, a separate expansion pass inserted every row as `pending` and the
-- dispatch rewrote it: two writes of the row and its three index entries per device, and the
-- first 20 seconds of a million-device campaign spent before anything was sent.

-- Which pass of the current wave the driver is in: 0 = devices seen within the active window,
-- 1 = every targeted device not yet dispatched. `expand_cursor` is the pass's position.
ALTER TABLE campaigns ADD COLUMN dispatch_pass smallint NOT NULL DEFAULT 0
    CHECK (dispatch_pass IN (0, 1));

-- Campaigns expanded by the old driver: their pending rows are dropped and the walk restarts
-- at the beginning of the current wave; devices already dispatched have rows and are skipped.
DELETE FROM campaign_devices d USING campaigns c
    WHERE d.campaign_id = c.id AND d.status = 'pending' AND c.state IN ('pending', 'running', 'paused');
UPDATE campaigns SET expand_cursor = NULL, dispatch_pass = 0
    WHERE state IN ('pending', 'running', 'paused');

-- Counts by status (progress, max in flight, devices of a wave still waiting) are what reads
-- this index now; the dispatch no longer pages through it by priority and id.
DROP INDEX campaign_devices_dispatch;
CREATE INDEX campaign_devices_status ON campaign_devices (campaign_id, status, wave);

-- Foreign keys checked every inserted row with a query and a row lock on the referenced
-- row: 75% of the cost of inserting a `campaign_devices` row, 15% of a campaign's device
-- update (its `desired_history` row), and every dispatch transaction share-locked the same
-- `campaigns` row. Only devsync's own code inserts these rows (the campaign driver for a
-- campaign it just loaded and devices it just updated, the desired-state trigger for a device
-- it just changed), so what the keys still did is the cascade on delete, which these triggers
-- keep, and refusing to rename a device that has history, which the last one keeps.
ALTER TABLE campaign_devices DROP CONSTRAINT campaign_devices_campaign_id_fkey;
ALTER TABLE campaign_devices DROP CONSTRAINT campaign_devices_device_id_fkey;
ALTER TABLE desired_history DROP CONSTRAINT desired_history_device_id_fkey;

CREATE FUNCTION devsync_delete_device_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM campaign_devices c USING old_rows o WHERE c.device_id = o.id;
    DELETE FROM desired_history h USING old_rows o WHERE h.device_id = o.id;
    RETURN NULL;
END $$;

CREATE TRIGGER devices_delete_rows
    AFTER DELETE ON devices
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devsync_delete_device_rows();

CREATE FUNCTION devsync_delete_campaign_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM campaign_devices c USING old_rows o WHERE c.campaign_id = o.id;
    RETURN NULL;
END $$;

CREATE TRIGGER campaigns_delete_rows
    AFTER DELETE ON campaigns
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devsync_delete_campaign_rows();

CREATE FUNCTION devsync_refuse_device_rename() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM desired_history WHERE device_id = OLD.id)
        OR EXISTS (SELECT 1 FROM campaign_devices WHERE device_id = OLD.id) THEN
        RAISE EXCEPTION 'device % has desired-state history or campaign rows and cannot be renamed', OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER devices_refuse_rename
    BEFORE UPDATE OF id ON devices
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION devsync_refuse_device_rename();

-- The version trigger ran PL/pgSQL for every device update, reports and check-ins included
-- (a fifth of the cost of applying a report), to find that `desired` had not changed. The
-- comparison is now the trigger's WHEN condition, evaluated without calling the function; a
-- second trigger keeps refusing a version written without a change of `desired`.
DROP TRIGGER devices_bump_desired_version ON devices;
CREATE TRIGGER devices_bump_desired_version
    BEFORE UPDATE ON devices
    FOR EACH ROW WHEN (NEW.desired IS DISTINCT FROM OLD.desired)
    EXECUTE FUNCTION devsync_bump_desired_version();

CREATE FUNCTION devsync_keep_desired_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.desired_version := OLD.desired_version;
    RETURN NEW;
END $$;

CREATE TRIGGER devices_keep_desired_version
    BEFORE UPDATE ON devices
    FOR EACH ROW WHEN (NEW.desired IS NOT DISTINCT FROM OLD.desired
                       AND NEW.desired_version IS DISTINCT FROM OLD.desired_version)
    EXECUTE FUNCTION devsync_keep_desired_version();

-- The capture trigger joins the statement's old and new rows by id; the planner knows
-- nothing of transition tables and joined them in a nested loop, comparing every new row
-- with every old one (a third of the database's CPU in a campaign).
ALTER FUNCTION devsync_capture_desired_changes() SET enable_nestloop = off;

-- The history's B-tree on changed_at took a third of the index work of every desired change
-- (a campaign writes one history row per device). Rows arrive in time order and are never
-- updated, so a BRIN index keeps trimming the history by age cheap at a fraction of the cost.
DROP INDEX desired_history_changed_at;
CREATE INDEX desired_history_changed_at ON desired_history USING brin (changed_at);
