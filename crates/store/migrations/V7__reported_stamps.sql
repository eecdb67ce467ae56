-- Per-field write stamps of the reported document: JSON Pointer -> device sequence of the
-- report that wrote (or removed) the field. JetStream may hand a device's report N to a worker
-- after report N+1 (redelivery after a worker died, a retried batch); with the stamps a late
-- report still applies whatever no later report wrote, so no report is lost and none undoes a
-- newer one. See `devsync_types::state::apply_stamped`.
ALTER TABLE devices ADD COLUMN reported_stamps jsonb NOT NULL DEFAULT '{}'::jsonb;
