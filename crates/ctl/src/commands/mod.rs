//! One module per `devsyncctl` command.

pub mod bootstrap;
pub mod migrate;
pub mod status;
pub mod up;
