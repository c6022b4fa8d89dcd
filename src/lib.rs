//! Herald: a push cluster. Backend services call the gRPC control API
//! (`herald.v1.PushService`) to push JSON messages to users; browsers hold
//! WebSocket connections to any node and receive them on every device.
//!
//! # Layout
//!
//! * [`config`]: command line, environment and config file.
//! * [`server`]: listeners, the node's lifecycle, graceful shutdown, admin
//!   HTTP (metrics, health).
//! * [`grpc`]: the PushService edge: protobuf in, status codes out.
//! * [`auth`]: JWTs for WebSocket clients, the API key for gRPC callers.
//! * [`ws`]: the WebSocket handshake and the per-connection task.
//! * [`protocol`]: wire protocol v1: message ids and frames.
//! * [`hub`]: this node's connections and their bounded send queues.
//! * [`node`]: the core: validation, routing, inbox semantics.
//! * [`backend`]: what nodes share (broker, presence, inbox), embedded in
//!   [`backend::memory`] or in Redis in [`backend::redis`].
//! * [`error`]: the error type and its gRPC status mapping.
//! * [`cli`]: `herald send`, a small client of the control API.

pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod node;
pub mod protocol;
pub mod server;
pub mod ws;

/// Generated protobuf types and gRPC stubs of `herald.v1`.
pub mod proto {
    tonic::include_proto!("herald.v1");
    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
}
