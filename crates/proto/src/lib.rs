//! devsync's wire contracts: the prost types generated from `proto/devsync/v1`.
//!
//! These types are for the edges only (decoding what arrives, encoding what leaves). Domain code
//! works on the types of `devsync-types`, converted with `TryFrom`. `proto/README.md` documents
//! the device protocol built from them.

/// `devsync.v1`: every message devices and services exchange.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/devsync.v1.rs"));
}

pub use prost;
pub use prost::Message;
pub use prost_types::Timestamp;
