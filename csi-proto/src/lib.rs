//! The Container Storage Interface, spec v1.12.0: messages, the Identity, Controller,
//! GroupController and Node services, and their tonic clients and servers.
//!
//! The definition lives in `proto/csi.proto`, written from the spec with the wire format unchanged
//! (names, field numbers, types), and is compiled at build time by protox + tonic-prost-build.

/// Package `csi.v1`.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// The CSI spec version this crate implements.
pub const CSI_SPEC_VERSION: &str = "1.12.0";
