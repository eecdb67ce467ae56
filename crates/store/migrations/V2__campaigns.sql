-- Campaigns: one desired-state change rolled out to many devices in waves.
CREATE TABLE campaigns (
    id             text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,128}$'),
    -- {"labels": {...}} | {"group": "..."} | {"ids": [...]}
    selector       jsonb NOT NULL CHECK (jsonb_typeof(selector) = 'object'),
    -- JSON merge patch applied to each targeted device's desired document.
    patch          jsonb NOT NULL CHECK (jsonb_typeof(patch) = 'object'),
    policy         text NOT NULL DEFAULT 'push' CHECK (policy IN ('push', 'push-active', 'pull-only')),
    rate_per_sec   integer CHECK (rate_per_sec IS NULL OR rate_per_sec > 0),
    max_in_flight  integer CHECK (max_in_flight IS NULL OR max_in_flight > 0),
    -- Cumulative share of targets per wave, in per mille, e.g. [1, 100, 500, 1000].
    waves          jsonb NOT NULL DEFAULT '[1000]'::jsonb CHECK (jsonb_typeof(waves) = 'array'),
    -- {"failure_ratio": 0.05, "not_converged_after_secs": 600}
    abort_criteria jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(abort_criteria) = 'object'),
    state          text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'paused', 'aborted', 'completed', 'expired')),
    state_reason   text,
    current_wave   integer NOT NULL DEFAULT 0,
    -- Last device id expanded from the selector (expansion is paged by id).
    expand_cursor  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX campaigns_state ON campaigns (state);

CREATE TABLE campaign_devices (
    campaign_id     text NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    device_id       text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    wave            integer NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'acked', 'converged', 'failed', 'skipped')),
    desired_version bigint,
    error           text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, device_id)
);
CREATE INDEX campaign_devices_status ON campaign_devices (campaign_id, status);
CREATE INDEX campaign_devices_wave ON campaign_devices (campaign_id, wave, status);
