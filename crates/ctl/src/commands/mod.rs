//! One module per `devsyncctl` command.

pub mod audit;
pub mod bootstrap;
pub mod campaign;
pub mod devices;
pub mod migrate;
pub mod smoke;
pub mod status;
pub mod up;
