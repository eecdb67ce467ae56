-- Partition creation tolerates a concurrent writer creating the same day's partition (two
-- audit replicas storing the first events of a new day).
CREATE OR REPLACE FUNCTION devsync_audit_ensure_partitions(from_day date, days integer) RETURNS integer
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
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                    part, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            EXCEPTION WHEN duplicate_table OR unique_violation OR invalid_object_definition THEN
                -- Another writer created it meanwhile.
                NULL;
            END;
        END IF;
    END LOOP;
    RETURN created;
END $$;
