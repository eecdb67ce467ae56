-- A chain link names its events by (event_id, at), not by event_id alone: the same action for
-- the same request can happen twice on one day (a device replaying a message after the
-- deduplication window, a request redelivered after a restart), and those are two events.
-- Links made before this migration have no times and keep being verified by id.
ALTER TABLE audit_chain ADD COLUMN event_ats timestamptz[];
