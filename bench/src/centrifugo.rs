//! Centrifugo v6 as a compared system: connection tokens for its JSON
//! client protocol, and a client of its GRPC server API (the messages of
//! `bench/proto/centrifugo_api.proto`, written by hand with prost so the
//! bench needs no protobuf compiler for them).
//!
//! Each bench user `u` is subscribed server-side, through the token's
//! `channels` claim, to its personal channel `#u` (the `#` makes it
//! user-limited) and to `broadcast`. A unicast to one user is a `Publish`
//! to `#u`; to several users, one `Broadcast` to their channels.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::codegen::http;
use tonic::transport::Channel;

/// The channel every client is subscribed to for broadcasts.
pub const BROADCAST_CHANNEL: &str = "broadcast";

/// The personal channel of `user`.
pub fn user_channel(user: &str) -> String {
    format!("#{user}")
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    channels: [String; 2],
}

/// An HS256 connection token for `user`, valid for a day, subscribing it
/// server-side to `#<user>` and the broadcast channel.
pub fn token(secret: &str, user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        + 24 * 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: user,
            exp,
            channels: [user_channel(user), BROADCAST_CHANNEL.into()],
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ApiError {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishResponse {
    #[prost(message, optional, tag = "1")]
    pub error: Option<ApiError>,
    // result (2) is not read.
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BroadcastRequest {
    #[prost(string, repeated, tag = "1")]
    pub channels: Vec<String>,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BroadcastResponse {
    #[prost(message, optional, tag = "1")]
    pub error: Option<ApiError>,
    #[prost(message, optional, tag = "2")]
    pub result: Option<BroadcastResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BroadcastResult {
    #[prost(message, repeated, tag = "1")]
    pub responses: Vec<PublishResponse>,
}

/// A client of Centrifugo's GRPC API on one channel (HTTP/2 connection).
#[derive(Clone)]
pub struct CentrifugoApi {
    inner: tonic::client::Grpc<Channel>,
}

impl CentrifugoApi {
    pub fn new(ch: Channel) -> Self {
        CentrifugoApi {
            inner: tonic::client::Grpc::new(ch),
        }
    }

    async fn unary<Req, Resp>(&mut self, path: &'static str, req: Req) -> Result<Resp, String>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| format!("centrifugo API not ready: {e}"))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        self.inner
            .unary(
                tonic::Request::new(req),
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{path}: {}: {}", s.code(), s.message()))
    }

    /// Publishes `data` (JSON) into `channel`.
    pub async fn publish(&mut self, channel: String, data: Vec<u8>) -> Result<(), String> {
        let r: PublishResponse = self
            .unary(
                "/centrifugal.centrifugo.api.CentrifugoApi/Publish",
                PublishRequest { channel, data },
            )
            .await?;
        match r.error {
            Some(e) => Err(format!("Publish: error {}: {}", e.code, e.message)),
            None => Ok(()),
        }
    }

    /// Publishes `data` into each of `channels` (one call).
    pub async fn broadcast(&mut self, channels: Vec<String>, data: Vec<u8>) -> Result<(), String> {
        let r: BroadcastResponse = self
            .unary(
                "/centrifugal.centrifugo.api.CentrifugoApi/Broadcast",
                BroadcastRequest { channels, data },
            )
            .await?;
        if let Some(e) = r.error {
            return Err(format!("Broadcast: error {}: {}", e.code, e.message));
        }
        for p in r.result.map(|r| r.responses).unwrap_or_default() {
            if let Some(e) = p.error {
                return Err(format!(
                    "Broadcast: a channel failed: {}: {}",
                    e.code, e.message
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_subscribes_the_user_to_its_channel_and_broadcast() {
        let t = super::token("secret-123", "alice");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.required_spec_claims = ["exp", "sub"].into_iter().map(String::from).collect();
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"secret-123"),
            &v,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(
            claims["channels"],
            serde_json::json!(["#alice", "broadcast"])
        );
    }
}
