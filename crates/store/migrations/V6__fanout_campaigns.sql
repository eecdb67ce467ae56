-- Fan-out, campaigns and scheduled jobs.

-- Devices not seen for a while are marked inactive by a sweep; any sign of life clears it.
ALTER TABLE devices ADD COLUMN active boolean NOT NULL DEFAULT true;

-- Device rows are updated all the time (desired by admins and campaigns, reported by the
-- reconciler): room on each page keeps updates that change no indexed column HOT (no index
-- writes, no GIN insert for the labels).
ALTER TABLE devices SET (fillfactor = 80);

-- RFC 7386 JSON merge patch, set-based, for campaigns: `null` removes a member, objects merge
-- recursively, anything else replaces.
CREATE FUNCTION devsync_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    key text;
    value jsonb;
    result jsonb;
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        result := '{}'::jsonb;
    ELSE
        result := target;
    END IF;
    FOR key, value IN SELECT * FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(value) = 'null' THEN
            result := result - key;
        ELSE
            result := jsonb_set(result, ARRAY[key], devsync_merge_patch(result -> key, value));
        END IF;
    END LOOP;
    RETURN result;
END $$;

-- Changes made by a campaign (`devsync.change_source = 'campaign:<id>'`) keep their history
-- (a waking device still gets them as a delta) but are not relayed one by one: the campaign
-- driver hands them to the fan-out in batches at the campaign's rate.
CREATE OR REPLACE FUNCTION devsync_capture_desired_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    captured bigint;
    src text := coalesce(nullif(current_setting('devsync.change_source', true), ''), 'sql');
    relayed boolean := src NOT LIKE 'campaign:%';
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
        SELECT id, version, (SELECT count(*) FROM changed) > 100, src FROM changed
        WHERE relayed ORDER BY id;
    ELSE
        WITH changed AS (
            SELECT n.id, n.desired_version AS version, n.desired
            FROM new_rows n WHERE n.desired_version > 0
        ), history AS (
            INSERT INTO desired_history (device_id, version, desired, source)
            SELECT id, version, desired, src FROM changed
        )
        INSERT INTO desired_changes (device_id, desired_version, bulk, source)
        SELECT id, version, (SELECT count(*) FROM changed) > 100, src FROM changed
        WHERE relayed ORDER BY id;
    END IF;
    GET DIAGNOSTICS captured = ROW_COUNT;
    IF captured > 0 THEN
        PERFORM pg_notify('devsync_desired_changes', '');
    END IF;
    RETURN NULL;
END $$;

-- Campaign progress, so a driver or fan-out restart resumes where it stopped.
ALTER TABLE campaigns
    ADD COLUMN expanded boolean NOT NULL DEFAULT false,
    ADD COLUMN targeted bigint NOT NULL DEFAULT 0,
    -- When the current wave had every device dispatched.
    ADD COLUMN wave_dispatched_at timestamptz,
    -- How long a dispatched wave waits for its devices to acknowledge before the next starts.
    ADD COLUMN wave_wait_secs integer NOT NULL DEFAULT 300 CHECK (wave_wait_secs >= 0),
    ADD COLUMN started_at timestamptz,
    ADD COLUMN finished_at timestamptz;

-- Active devices (seen recently when the campaign was expanded) are dispatched first.
ALTER TABLE campaign_devices
    ADD COLUMN priority smallint NOT NULL DEFAULT 1,
    ADD COLUMN sent_at timestamptz;
DROP INDEX campaign_devices_wave;
-- (campaign_id, status) is the dispatch index's prefix.
DROP INDEX campaign_devices_status;
CREATE INDEX campaign_devices_dispatch
    ON campaign_devices (campaign_id, status, wave, priority, device_id);
CREATE INDEX campaign_devices_device ON campaign_devices (device_id, status);

-- Each service sweeps only its own outbox rows (it may publish only its own subjects).
ALTER TABLE outbox ADD COLUMN owner text NOT NULL DEFAULT '';
DROP INDEX outbox_unpublished;
CREATE INDEX outbox_unpublished ON outbox (owner, id) WHERE published_at IS NULL;

-- Every run of a scheduled sweep, by whichever requestor replica held the lease.
CREATE TABLE sweep_runs (
    id          bigserial PRIMARY KEY,
    sweep       text NOT NULL,
    worker      text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    affected    bigint NOT NULL DEFAULT 0,
    error       text
);
CREATE INDEX sweep_runs_started ON sweep_runs (sweep, started_at DESC);
