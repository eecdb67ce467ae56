//! Claim check (used by the requestor to store, by the reconciler to load): a payload over the threshold is stored once in the `devsync-blobs` object
//! store under the hex SHA-256 of its content, and the message carries a reference instead.

use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use devsync_proto::v1::{BlobRef, Payload, payload};
use devsync_types::names;
use sha2::{Digest, Sha256};

/// Stores `bytes` (if not already stored) and returns the reference payload.
pub async fn store(js: &jetstream::Context, bytes: Bytes) -> Result<Payload, String> {
    let name = format!("{:x}", Sha256::digest(&bytes));
    let store = js
        .get_object_store(names::OBJECT_BLOBS)
        .await
        .map_err(|e| format!("object store: {e}"))?;
    if store.info(&name).await.is_err() {
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            ..Default::default()
        };
        store
            .put(meta, &mut bytes.as_ref())
            .await
            .map_err(|e| format!("store blob: {e}"))?;
    }
    Ok(Payload {
        body: Some(payload::Body::Blob(BlobRef {
            bucket: names::OBJECT_BLOBS.into(),
            name,
            size: bytes.len() as u64,
        })),
    })
}

/// Reads the bytes a payload carries, fetching claim-checked ones from the object store.
pub async fn load(js: &jetstream::Context, payload: &Payload) -> Result<Bytes, String> {
    match &payload.body {
        Some(payload::Body::InlineJson(bytes)) => Ok(bytes.clone()),
        Some(payload::Body::Blob(blob)) => {
            use tokio::io::AsyncReadExt;
            let store = js
                .get_object_store(&blob.bucket)
                .await
                .map_err(|e| format!("object store {}: {e}", blob.bucket))?;
            let mut object = store
                .get(&blob.name)
                .await
                .map_err(|e| format!("blob {}: {e}", blob.name))?;
            let mut buffer = Vec::with_capacity(blob.size as usize);
            object
                .read_to_end(&mut buffer)
                .await
                .map_err(|e| format!("read blob {}: {e}", blob.name))?;
            Ok(buffer.into())
        }
        None => Ok(Bytes::from_static(b"{}")),
    }
}
