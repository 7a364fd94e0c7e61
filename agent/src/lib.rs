//! tollgate: eBPF-assisted host enforcement for AI agents (library behind the `tollgate` binary).
pub mod agent;
pub mod approval;
pub mod audit;
pub mod cgroup;
pub mod identity;
pub mod ids;
pub mod kernel;
pub mod mask;
pub mod policy;
pub mod proxy;
pub mod sql;
pub mod state;
pub mod timer;
pub mod tls;
