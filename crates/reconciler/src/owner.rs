//! Runs the worker loops of the partitions this replica owns, and hands partitions over when
//! the assignment changes: a released partition's loops finish their batch and stop, then the
//! pin is released so the new owner gets the partition at once instead of after the pin timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use async_nats::jetstream;
use devsync_runtime::Shutdown;
use devsync_runtime::service::Service;
use devsync_runtime::worker::{self, WorkerMetrics};
use devsync_types::{Lane, Partition, names};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::apply::Applier;

/// Keeps the running loops in line with the assignment.
pub struct Owner {
    pub service: Service,
    pub appliers: [Applier; 2],
    pub metrics: WorkerMetrics,
    /// The partitions this replica runs now (shared with `Running`).
    pub owned: Arc<RwLock<BTreeSet<Partition>>>,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner").finish_non_exhaustive()
    }
}

struct Running {
    token: Shutdown,
    loops: JoinSet<()>,
}

impl Owner {
    /// Follows `assignment` until `shutdown`, then stops every loop.
    pub async fn run(
        self,
        mut assignment: watch::Receiver<BTreeSet<Partition>>,
        shutdown: Shutdown,
    ) {
        let mut running: BTreeMap<Partition, Running> = BTreeMap::new();
        loop {
            let wanted = assignment.borrow_and_update().clone();
            let current: BTreeSet<Partition> = running.keys().copied().collect();
            for partition in current.difference(&wanted) {
                if let Some(stopping) = running.remove(partition) {
                    self.release(*partition, stopping).await;
                }
            }
            for partition in wanted.difference(&current) {
                running.insert(*partition, self.start(*partition, &shutdown));
            }
            if wanted != current {
                tracing::info!(partitions = wanted.len(), "partition assignment applied");
            }
            *self.owned.write().expect("owned lock") = wanted;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = assignment.changed() => if changed.is_err() { break },
            }
        }
        for (partition, stopping) in std::mem::take(&mut running) {
            self.release(partition, stopping).await;
        }
        self.owned.write().expect("owned lock").clear();
    }

    fn start(&self, partition: Partition, shutdown: &Shutdown) -> Running {
        let token = shutdown.child_token();
        let mut loops = JoinSet::new();
        for applier in &self.appliers {
            let consumer = names::reconcile_consumer(applier.lane, partition);
            let spec = self.service.worker_spec(
                names::STREAM_REQ,
                &consumer,
                Some(names::RECONCILE_GROUP),
            );
            loops.spawn(worker::run(
                self.service.js.clone(),
                spec,
                Arc::new(applier.clone()),
                self.metrics.clone(),
                token.clone(),
            ));
        }
        Running { token, loops }
    }

    async fn release(&self, partition: Partition, mut stopping: Running) {
        stopping.token.cancel();
        while stopping.loops.join_next().await.is_some() {}
        unpin(&self.service.js, partition).await;
    }
}

async fn unpin(js: &jetstream::Context, partition: Partition) {
    let Ok(stream) = js.get_stream_no_info(names::STREAM_REQ).await else {
        return;
    };
    for lane in Lane::ALL {
        let consumer = names::reconcile_consumer(lane, partition);
        if let Err(error) = stream
            .unpin_consumer(&consumer, names::RECONCILE_GROUP)
            .await
        {
            tracing::debug!(%consumer, %error, "unpin");
        }
    }
}
