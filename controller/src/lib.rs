//! Barnacle controller: the CSI Identity and Controller services, placement and volume records (issue: the CSI controller).
//!
//! Not built yet: this crate only reserves its place in the workspace. Its work is tracked by its
//! own issue and starts after the replica has landed.
