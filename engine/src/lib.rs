//! Barnacle engine: one volume's NBD frontend and synchronous replication to its replicas (issue: the engine).
//!
//! Not built yet: this crate only reserves its place in the workspace. Its work is tracked by its
//! own issue and starts after the replica has landed.
