//! Reconciler membership and partition assignment.
//!
//! Each replica heartbeats `reconciler.<instance>` in the `devsync-members` KV bucket and reads
//! the other entries every beat. Members are the entries refreshed within `member_ttl` of the
//! freshest one (server timestamps, so replica clocks do not matter). Partitions are assigned by
//! rendezvous hashing: each partition goes to the member with the highest hash of
//! (member, partition). Every replica computes the same answer from the same members, and
//! adding or removing a member moves only the partitions it gains or loses. A replica leaving
//! cleanly deletes its entry so the others take over at the next beat.
//!
//! Ownership is for throughput (batches without contention); correctness never depends on it:
//! the pinned-client consumers keep one active puller per partition, and PostgreSQL row locks
//! plus the applied-sequence check make a repeated request harmless.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use devsync_runtime::Shutdown;
use devsync_types::{Partition, PartitionCount, names};
use futures::TryStreamExt;
use tokio::sync::watch;

const KEY_PREFIX: &str = "reconciler.";

/// The partitions `me` owns among `members`.
pub fn assign(members: &[String], partitions: PartitionCount, me: &str) -> BTreeSet<Partition> {
    partitions
        .all()
        .filter(|partition| owner(members, *partition).is_some_and(|owner| owner == me))
        .collect()
}

/// The member that owns `partition`.
pub fn owner(members: &[String], partition: Partition) -> Option<&str> {
    members
        .iter()
        .max_by_key(|member| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            member.hash(&mut hasher);
            partition.0.hash(&mut hasher);
            (hasher.finish(), member.as_str())
        })
        .map(String::as_str)
}

/// Heartbeats this replica and publishes the member list as it changes.
pub async fn run(
    js: jetstream::Context,
    instance: String,
    ttl: Duration,
    shutdown: Shutdown,
) -> anyhow::Result<watch::Receiver<Vec<String>>> {
    let kv = js.get_key_value(names::KV_MEMBERS).await?;
    let key = format!("{KEY_PREFIX}{instance}");
    kv.put(&key, instance.clone().into()).await?;
    let first = members(&kv, ttl)
        .await
        .unwrap_or_else(|_| vec![instance.clone()]);
    let (tx, rx) = watch::channel(first);
    let beat = (ttl / 4).max(Duration::from_millis(250));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(beat);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(error) = kv.put(&key, instance.clone().into()).await {
                tracing::warn!(%error, "membership heartbeat failed");
                continue;
            }
            match members(&kv, ttl).await {
                Ok(list) => {
                    tx.send_if_modified(|current| {
                        if *current == list {
                            return false;
                        }
                        tracing::info!(members = ?list, "reconciler membership changed");
                        *current = list;
                        true
                    });
                }
                Err(error) => tracing::warn!(%error, "cannot read membership"),
            }
        }
        if let Err(error) = kv.delete(&key).await {
            tracing::warn!(%error, "cannot leave membership");
        }
    });
    Ok(rx)
}

async fn members(kv: &kv::Store, ttl: Duration) -> anyhow::Result<Vec<String>> {
    let keys: Vec<String> = kv.keys().await?.try_collect().await?;
    let mut entries = Vec::new();
    for key in keys.into_iter().filter(|k| k.starts_with(KEY_PREFIX)) {
        if let Some(entry) = kv.entry(&key).await?
            && entry.operation == kv::Operation::Put
        {
            entries.push((key[KEY_PREFIX.len()..].to_owned(), entry.created));
        }
    }
    let Some(newest) = entries.iter().map(|(_, at)| *at).max() else {
        return Ok(Vec::new());
    };
    let ttl = time::Duration::try_from(ttl).unwrap_or(time::Duration::seconds(10));
    let mut list: Vec<String> = entries
        .into_iter()
        .filter(|(_, at)| newest - *at <= ttl)
        .map(|(member, _)| member)
        .collect();
    list.sort();
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner() {
        let count = PartitionCount::new(64).unwrap();
        let all = members(&["a", "b", "c"]);
        let mut seen = BTreeSet::new();
        for me in &all {
            let mine = assign(&all, count, me);
            assert!(!mine.is_empty(), "{me} owns something");
            assert!(seen.is_disjoint(&mine));
            seen.extend(mine);
        }
        assert_eq!(seen.len(), 64);
    }

    #[test]
    fn adding_a_member_moves_only_what_it_gains() {
        let count = PartitionCount::new(64).unwrap();
        let before = members(&["a", "b"]);
        let after = members(&["a", "b", "c"]);
        let gained = assign(&after, count, "c");
        for me in ["a", "b"] {
            let lost: BTreeSet<_> = assign(&before, count, me)
                .difference(&assign(&after, count, me))
                .copied()
                .collect();
            assert!(lost.is_subset(&gained), "{me} lost only to c");
        }
    }
}
