//! One module per `devsyncctl` command.

pub mod audit;
pub mod bootstrap;
pub mod migrate;
pub mod smoke;
pub mod status;
pub mod up;
