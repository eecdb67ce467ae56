-- A campaign patches thousands of devices per statement, and the version trigger called
-- PL/pgSQL for each of them only to write `OLD.desired_version + 1` and two timestamps (a
-- third of the statement's cost). A statement may now write the new version itself
-- (`desired_version = desired_version + 1, desired_changed_at = now()`); the trigger runs only
-- when a changed document comes with anything else, so a version still cannot be forged: a
-- version other than the next one, or the next one without a new change time, is corrected
-- as before.
DROP TRIGGER devices_bump_desired_version ON devices;
CREATE TRIGGER devices_bump_desired_version
    BEFORE UPDATE ON devices
    FOR EACH ROW WHEN (NEW.desired IS DISTINCT FROM OLD.desired
                       AND (NEW.desired_version IS DISTINCT FROM OLD.desired_version + 1
                            OR NEW.desired_changed_at IS NOT DISTINCT FROM OLD.desired_changed_at))
    EXECUTE FUNCTION devsync_bump_desired_version();

-- Such a statement over a device whose document the patch leaves as it was keeps the old
-- version (the trigger that already refused a version without a change), and now the old
-- change time with it.
CREATE OR REPLACE FUNCTION devsync_keep_desired_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.desired_version := OLD.desired_version;
    NEW.desired_changed_at := OLD.desired_changed_at;
    RETURN NEW;
END $$;

-- Registering a device without a desired document (the usual case) no longer calls PL/pgSQL.
DROP TRIGGER devices_initial_desired_version ON devices;
CREATE TRIGGER devices_initial_desired_version
    BEFORE INSERT ON devices
    FOR EACH ROW WHEN (NEW.desired <> '{}'::jsonb AND NEW.desired_version = 0)
    EXECUTE FUNCTION devsync_initial_desired_version();

-- Every device row is rewritten by each report, check-in and desired change. An update stays
-- on its page (HOT: no new entries in the primary key and the labels' GIN index) only if the
-- page has room for the new row version while the old one is still visible, which with 20%
-- free was true for about one row in four when a campaign patched devices stored next to each
-- other. Half of each page is now kept free (new and rewritten pages).
ALTER TABLE devices SET (fillfactor = 50);
