//! Which push policy applies to a delivery.
//!
//! In order: the policy the task carries; else its campaign's (read from PostgreSQL, cached
//! briefly); else the global policy, which an SRE changes live with a KV put of `push`,
//! `push-active` or `pull-only` under `push_policy` in the `devsync-config` bucket (watched, so
//! a change applies to the next delivery without a restart). A value that is not a policy is
//! logged and ignored; deleting the key returns to the configured default.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use deadpool_postgres::Pool;
use devsync_proto::v1 as pb;
use devsync_runtime::Shutdown;
use devsync_types::{PushPolicy, names};
use futures::StreamExt as _;
use moka::future::Cache;

/// Resolves push policies.
#[derive(Clone)]
pub struct Policies {
    global: Arc<RwLock<PushPolicy>>,
    campaigns: Cache<String, Option<PushPolicy>>,
    pool: Pool,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("global", &self.global())
            .finish_non_exhaustive()
    }
}

impl Policies {
    /// Reads the global policy from `config` and keeps following it until `shutdown`.
    pub async fn start(
        config: kv::Store,
        pool: Pool,
        default: PushPolicy,
        campaign_ttl: Duration,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        // Read once before serving, so the first delivery already uses the configured value.
        let initial = match config.get(names::CONFIG_PUSH_POLICY).await? {
            Some(value) => String::from_utf8_lossy(&value)
                .trim()
                .parse::<PushPolicy>()
                .unwrap_or(default),
            None => default,
        };
        let global = Arc::new(RwLock::new(initial));
        let mut watch = config.watch_with_history(names::CONFIG_PUSH_POLICY).await?;
        let shared = global.clone();
        tokio::spawn(async move {
            loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    entry = watch.next() => entry,
                };
                let Some(entry) = entry else { break };
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(error) => {
                        tracing::warn!(%error, "push policy watch failed");
                        continue;
                    }
                };
                let policy = match entry.operation {
                    kv::Operation::Put => {
                        let text = String::from_utf8_lossy(&entry.value);
                        match text.trim().parse::<PushPolicy>() {
                            Ok(policy) => policy,
                            Err(error) => {
                                tracing::warn!(%error, "ignoring the configured push policy");
                                continue;
                            }
                        }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => default,
                };
                tracing::info!(%policy, "global push policy");
                *shared.write().expect("policy lock") = policy;
            }
        });
        Ok(Self {
            global,
            campaigns: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(campaign_ttl)
                .build(),
            pool,
        })
    }

    /// The global policy now.
    pub fn global(&self) -> PushPolicy {
        *self.global.read().expect("policy lock")
    }

    /// The policy for a delivery that carries `own` and belongs to `campaign` (empty: none).
    pub async fn resolve(&self, own: i32, campaign: &str) -> PushPolicy {
        if let Some(policy) = from_proto(own) {
            return policy;
        }
        if !campaign.is_empty()
            && let Some(policy) = self.campaign(campaign).await
        {
            return policy;
        }
        self.global()
    }

    async fn campaign(&self, id: &str) -> Option<PushPolicy> {
        let pool = self.pool.clone();
        let key = id.to_owned();
        self.campaigns
            .get_with(id.to_owned(), async move {
                let client = pool.get().await.ok()?;
                let row = client
                    .query_opt("SELECT policy FROM campaigns WHERE id = $1", &[&key])
                    .await
                    .ok()??;
                row.get::<_, String>(0).parse().ok()
            })
            .await
    }
}

/// The policy a protobuf enum value names, if any.
pub fn from_proto(value: i32) -> Option<PushPolicy> {
    match pb::PushPolicy::try_from(value).ok()? {
        pb::PushPolicy::Unspecified => None,
        pb::PushPolicy::Push => Some(PushPolicy::Push),
        pb::PushPolicy::PushActive => Some(PushPolicy::PushActive),
        pb::PushPolicy::PullOnly => Some(PushPolicy::PullOnly),
    }
}

/// The protobuf value of `policy`.
pub fn to_proto(policy: PushPolicy) -> pb::PushPolicy {
    match policy {
        PushPolicy::Push => pb::PushPolicy::Push,
        PushPolicy::PushActive => pb::PushPolicy::PushActive,
        PushPolicy::PullOnly => pb::PushPolicy::PullOnly,
    }
}
