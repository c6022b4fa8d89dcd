//! Herald: a push cluster. Backend services call the gRPC control API
//! (`herald.v1.PushService`) to push JSON messages to users; browsers hold
//! WebSocket connections to any node and receive them on every device.
//!
//! # Layout
//!
//! The path of a `SendToUser` reads top to bottom: `grpc` turns the call
//! into a `Node` call; `node` validates it, asks the inbox to store and
//! publish; the backend's broker hands the event to the `hub` of every node
//! holding the user; each connection task in `ws` writes the shared frame.
//!
//! * [`config`]: command line, environment and config file (public: the
//!   binary and tests build a [`config::Config`] from it).
//! * [`server`]: listeners, the node's lifecycle, graceful shutdown, the
//!   admin listener (metrics, health). [`server::run`] is the entry point.
//! * `http`: the HTTP/1.1 accept loop and responses shared by the public and
//!   admin listeners.
//! * `grpc`: the PushService edge: protobuf in, status codes out.
//! * [`auth`]: JWTs for WebSocket clients (HMAC, RSA, EC, Ed25519, JWKS;
//!   the JWKS file in `auth/jwks.rs`).
//! * [`apikey`]: scoped API keys for gRPC callers.
//! * [`origin`]: the Origin allow-list of the WebSocket handshake.
//! * [`tls`]: rustls acceptors and the certificate that reloads itself.
//! * `expiry`: closes connections whose token expired (one map per node).
//! * `ws`: the public listener's gateway (`ws/mod.rs`), what a handshake
//!   carries (`ws/handshake.rs`), the per-connection task (`ws/conn.rs`: a
//!   `Session` with one method per event), client frames and their budget
//!   (`ws/frames.rs`), the plain HTTP routes and the embedded demo page
//!   (`ws/routes.rs`), `/herald.js` with CORS (`ws/client_js.rs`).
//! * `protocol`: wire protocol v1: message ids, frames, close codes.
//! * `hub`: this node's connections and their bounded send queues.
//! * `node`: the core: validation, routing, inbox semantics.
//! * `center`: the message center's operations from either entry point (a
//!   client frame, an RPC): one request type, validated once against the
//!   entry point's limits, applied by one function.
//! * `batch`: `SendBatch` on the node: many independent sends, one inbox
//!   append and one publish for all of them, a result per item.
//! * `backend`: what nodes share (broker, presence, inbox), one trait per
//!   concern, embedded in `backend::memory` or in Redis in `backend::redis`.
//! * `outbox`: the PostgreSQL outbox consumer (`--outbox-postgres`): one
//!   node at a time (an advisory lock) delivers the rows services commit,
//!   with a key per row, in per-user order; `outbox/sql.rs` holds the DDL
//!   and the statements, `outbox/deliver.rs` a batch's order and retries.
//! * `error`: the error type and its gRPC status mapping.
//! * [`telemetry`]: the log: its format and filter, the event-log lines
//!   (connections, refusals, calls), the rate limit on repeated refusals.
//! * [`cli`]: the client subcommands: `herald send` (a gRPC client that
//!   says what to fix when a call fails, in `cli/reach.rs`), `herald
//!   listen` (a WebSocket client that connects like a browser), `herald
//!   token` and `herald jwks` (development credentials).
//!
//! Modules depend downwards only: `server` → `ws`/`grpc`/`http`/`outbox` → `batch`/`center` → `node` →
//! `hub`/`backend` → `protocol`/`error`/`config`. Backends reach this node's
//! connections through a trait, never the hub's concrete type.
//!
//! The load generator lives in its own crate (`bench/`), so the server
//! neither compiles nor links it.

pub mod apikey;
pub mod auth;
mod backend;
mod batch;
mod center;
pub mod cli;
pub mod config;
mod error;
mod expiry;
mod grpc;
mod http;
mod hub;
mod node;
pub mod origin;
mod outbox;
mod protocol;
pub mod server;
pub mod telemetry;
pub mod tls;
mod ws;

/// Generated protobuf types and gRPC stubs of `herald.v1`.
pub mod proto {
    tonic::include_proto!("herald.v1");
    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
}
