//! Storing audit events: a batch of `DEVSYNC_AUDIT` messages becomes one transaction.

use deadpool_postgres::Pool;
use devsync_runtime::worker::{Delivery, Handler, Outcome};
use devsync_types::AuditRecord;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Ingest metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    stored: Counter,
    duplicates: Counter,
}

impl Metrics {
    /// Registers the ingest metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "devsync_audit_events_stored",
            "audit events stored",
            metrics.stored.clone(),
        );
        registry.register(
            "devsync_audit_events_duplicate",
            "audit events received again and not stored twice",
            metrics.duplicates.clone(),
        );
        metrics
    }
}

/// The `DEVSYNC_AUDIT` handler.
#[derive(Debug, Clone)]
pub struct Ingest {
    pool: Pool,
    metrics: Metrics,
}

impl Ingest {
    /// A handler storing into `pool`.
    pub fn new(pool: Pool, metrics: Metrics) -> Self {
        Self { pool, metrics }
    }
}

impl Handler for Ingest {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut included = Vec::new();
        for (index, delivery) in batch.iter().enumerate() {
            let events = match devsync_runtime::audit::decode(delivery.payload()) {
                Ok(events) => events,
                Err(error) => {
                    outcomes[index] = Outcome::Reject(format!("not an audit batch: {error}"));
                    continue;
                }
            };
            let converted: Result<Vec<AuditRecord>, _> =
                events.into_iter().map(AuditRecord::try_from).collect();
            match converted {
                Ok(mut list) => {
                    records.append(&mut list);
                    included.push(index);
                }
                Err(error) => {
                    outcomes[index] = Outcome::Reject(format!("invalid audit event: {error}"))
                }
            }
        }
        if records.is_empty() {
            return outcomes;
        }
        let stored = async {
            let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
            devsync_store::audit::insert(&mut client, &records)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match stored {
            Ok(new) => {
                self.metrics.stored.inc_by(new as u64);
                self.metrics.duplicates.inc_by((records.len() - new) as u64);
            }
            Err(error) => {
                tracing::warn!(%error, events = records.len(), "cannot store audit events; retrying");
                for index in included {
                    outcomes[index] = Outcome::Retry(format!("store: {error}"));
                }
            }
        }
        outcomes
    }
}
