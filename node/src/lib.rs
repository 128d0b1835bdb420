//! Barnacle node: the CSI Identity and Node services: stage, publish, stats, expansion (issue: the CSI node plugin).
//!
//! Not built yet: this crate only reserves its place in the workspace. Its work is tracked by its
//! own issue and starts after the replica has landed.
