-- The outbox holds each transaction's outputs (audit events, pushes, stages) until they are
-- published: written once, read back only by a sweep after a failed publish, deleted within
-- milliseconds. PostgreSQL compressed every such row with pglz (about 1% of all CPU at full
-- report load); lz4 does the same job several times cheaper. A server built without lz4
-- keeps pglz.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: the outbox keeps pglz';
END
$$;
