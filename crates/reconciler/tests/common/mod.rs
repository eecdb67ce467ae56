//! The shared test stack (`devsync-stack`).

#![allow(unused_imports)]

pub use devsync_stack::*;
