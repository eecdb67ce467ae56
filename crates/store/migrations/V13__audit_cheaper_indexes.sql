-- Storing an audit event was mostly index work (44% of the audit service's database CPU
-- during the report benchmark, two events per report): the primary key (event_id, at) and
-- the request index put every new event at a random place of a B-tree of long text keys.
-- Measured on a million events shaped like the benchmark's (bench PostgreSQL settings):
-- heap alone 1.0 s; primary key (event_id, at) 2.9 s, (at, event_id) 0.8 s; B-tree on
-- request_id 2.6 s, hash 1.5 s; (device_id, at) 2.6 s; (worker_id, at) 1.5 s.
--
-- * The primary key is (at, event_id): the same pair is unique either way (an event stored
--   twice is still stored once), new events land at the right edge (they arrive in time
--   order), and the comparison is nearly always decided by the timestamp. It also serves the
--   search's `ORDER BY at, event_id` keyset and the chain verification's (event_id, at) probes.
-- * Requests and traces are only ever looked up by equality: hash indexes.
ALTER TABLE audit_events DROP CONSTRAINT audit_events_pkey;
ALTER TABLE audit_events ADD PRIMARY KEY (at, event_id);

DROP INDEX audit_events_request;
CREATE INDEX audit_events_request ON audit_events USING hash (request_id);
DROP INDEX audit_events_trace;
CREATE INDEX audit_events_trace ON audit_events USING hash (trace_id) WHERE trace_id IS NOT NULL;
