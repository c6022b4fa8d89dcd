//! The sending side: Herald's gRPC PushService, or the bench protocol's HTTP
//! endpoints on the comparison servers:
//!
//! * `POST /send` `{"users":["u1",...],"payload":<JSON>}`: the payload to
//!   every connection of each user (one call, many users).
//! * `POST /broadcast` `{"payload":<JSON>}`: the payload to every connection.
//!
//! Both answer 200 once the message is handed to the server's fan-out.

use crate::centrifugo::{user_channel, CentrifugoApi, BROADCAST_CHANNEL};
use crate::http::HttpPool;
use crate::outbox::OutboxWriter;
use herald::proto::push_service_client::PushServiceClient;
use herald::proto::{
    BroadcastRequest, IsOnlineRequest, SendBatchRequest, SendToUserRequest, UnreadCountRequest,
};
use hyper::Method;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tonic::transport::{Channel, Endpoint};

pub enum Api {
    Grpc {
        nodes: Vec<Vec<PushServiceClient<Channel>>>,
        api_key: Option<String>,
        rr: AtomicUsize,
    },
    Http {
        nodes: Vec<HttpPool>,
    },
    /// Centrifugo's GRPC server API (see [`crate::centrifugo`]).
    Centrifugo {
        nodes: Vec<Vec<CentrifugoApi>>,
        rr: AtomicUsize,
    },
    /// Rows committed into Herald's outbox table (`--outbox-postgres`);
    /// a "node" is one of its PostgreSQL connections.
    Outbox(OutboxWriter),
}

impl Api {
    pub async fn grpc(
        urls: &[String],
        channels: usize,
        api_key: Option<String>,
    ) -> Result<Api, String> {
        let mut nodes = Vec::new();
        for u in urls {
            let mut chans = Vec::new();
            for _ in 0..channels.max(1) {
                let ep = Endpoint::from_shared(u.clone())
                    .map_err(|e| format!("--api {u:?}: {e}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(std::time::Duration::from_secs(5));
                let ch = ep
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach gRPC API at {u}: {e}"))?;
                chans.push(PushServiceClient::new(ch).max_decoding_message_size(64 << 20));
            }
            nodes.push(chans);
        }
        Ok(Api::Grpc {
            nodes,
            api_key,
            rr: AtomicUsize::new(0),
        })
    }

    /// `channels` HTTP/2 connections to each node's GRPC API.
    pub async fn centrifugo(urls: &[String], channels: usize) -> Result<Api, String> {
        let mut nodes = Vec::new();
        for u in urls {
            let mut chans = Vec::new();
            for _ in 0..channels.max(1) {
                let ch = Endpoint::from_shared(u.clone())
                    .map_err(|e| format!("--api {u:?}: {e}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach Centrifugo's GRPC API at {u}: {e}"))?;
                chans.push(CentrifugoApi::new(ch));
            }
            nodes.push(chans);
        }
        Ok(Api::Centrifugo {
            nodes,
            rr: AtomicUsize::new(0),
        })
    }

    fn centrifugo_client(&self, node: usize) -> CentrifugoApi {
        let Api::Centrifugo { nodes, rr } = self else {
            unreachable!("centrifugo only")
        };
        let chans = &nodes[node % nodes.len()];
        chans[rr.fetch_add(1, Relaxed) % chans.len()].clone()
    }

    pub fn http(urls: &[String], conns_per_node: usize) -> Result<Api, String> {
        Ok(Api::Http {
            nodes: urls
                .iter()
                .map(|u| HttpPool::new(u, conns_per_node))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn nodes(&self) -> usize {
        match self {
            Api::Grpc { nodes, .. } => nodes.len(),
            Api::Http { nodes } => nodes.len(),
            Api::Centrifugo { nodes, .. } => nodes.len(),
            Api::Outbox(w) => w.connections(),
        }
    }

    fn client(&self, node: usize) -> (PushServiceClient<Channel>, Option<&str>) {
        let Api::Grpc { nodes, api_key, rr } = self else {
            unreachable!("gRPC only")
        };
        let chans = &nodes[node % nodes.len()];
        (
            chans[rr.fetch_add(1, Relaxed) % chans.len()].clone(),
            api_key.as_deref(),
        )
    }

    fn req<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(k) = key {
            if let Ok(v) = format!("Bearer {k}").parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }

    async fn post(pool: &HttpPool, path: &str, body: String) -> Result<(), String> {
        post_ok(pool, path, body).await.map(|_| ())
    }

    /// A POST with a JSON body to a bench-protocol node; the reply body of
    /// a 200. For `--remote-sender`'s one call per step.
    pub async fn post_json(
        &self,
        node: usize,
        path: &str,
        body: String,
    ) -> Result<Vec<u8>, String> {
        let Api::Http { nodes } = self else {
            return Err(format!("POST {path}: only to a bench-protocol (HTTP) node"));
        };
        post_ok(&nodes[node % nodes.len()], path, body).await
    }

    /// One send to `users` through API node `node`.
    pub async fn send(
        &self,
        node: usize,
        users: Vec<String>,
        payload: String,
        transient: bool,
    ) -> Result<(), String> {
        match self {
            Api::Grpc { .. } => {
                let (mut c, key) = self.client(node);
                let r = SendToUserRequest {
                    user_ids: users,
                    topic: String::new(),
                    payload_json: payload,
                    transient,
                    ..Default::default()
                };
                c.send_to_user(Self::req(r, key))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("SendToUser: {}: {}", s.code(), s.message()))
            }
            Api::Http { nodes } => {
                let mut body = String::with_capacity(32 + payload.len() + users.len() * 24);
                body.push_str("{\"users\":[");
                for (k, u) in users.iter().enumerate() {
                    if k > 0 {
                        body.push(',');
                    }
                    body.push('"');
                    body.push_str(u); // bench user ids need no escaping
                    body.push('"');
                }
                body.push_str("],\"payload\":");
                body.push_str(&payload);
                body.push('}');
                Self::post(&nodes[node % nodes.len()], "/send", body).await
            }
            Api::Centrifugo { .. } => {
                let mut c = self.centrifugo_client(node);
                if users.len() == 1 {
                    c.publish(user_channel(&users[0]), payload.into_bytes())
                        .await
                } else {
                    let channels = users.iter().map(|u| user_channel(u)).collect();
                    c.broadcast(channels, payload.into_bytes()).await
                }
            }
            Api::Outbox(w) => w.send(node, users, payload, transient).await,
        }
    }

    /// One SendBatch through API node `node` (Herald only): one item per
    /// `(users, payload)`. Per item, Ok or the item's error.
    pub async fn send_batch(
        &self,
        node: usize,
        items: Vec<(Vec<String>, String)>,
        transient: bool,
    ) -> Result<Vec<Result<(), String>>, String> {
        if !matches!(self, Api::Grpc { .. }) {
            return Err("SendBatch is Herald's (--send-batch needs --target herald)".into());
        }
        let (mut c, key) = self.client(node);
        let n = items.len();
        let r = SendBatchRequest {
            items: items
                .into_iter()
                .map(|(user_ids, payload_json)| SendToUserRequest {
                    user_ids,
                    payload_json,
                    transient,
                    ..Default::default()
                })
                .collect(),
        };
        let out = c
            .send_batch(Self::req(r, key))
            .await
            .map_err(|s| format!("SendBatch: {}: {}", s.code(), s.message()))?
            .into_inner();
        if out.results.len() != n {
            return Err(format!(
                "SendBatch: {} results for {n} items",
                out.results.len()
            ));
        }
        Ok(out
            .results
            .into_iter()
            .map(|r| match r.error_code {
                0 => Ok(()),
                c => Err(format!("SendBatch item: code {c}: {}", r.error_message)),
            })
            .collect())
    }

    pub async fn broadcast(&self, node: usize, payload: String) -> Result<(), String> {
        match self {
            Api::Grpc { .. } => {
                let (mut c, key) = self.client(node);
                let r = BroadcastRequest {
                    topic: String::new(),
                    payload_json: payload,
                    ..Default::default()
                };
                c.broadcast(Self::req(r, key))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("Broadcast: {}: {}", s.code(), s.message()))
            }
            Api::Http { nodes } => {
                Self::post(
                    &nodes[node % nodes.len()],
                    "/broadcast",
                    format!("{{\"payload\":{payload}}}"),
                )
                .await
            }
            Api::Centrifugo { .. } => {
                self.centrifugo_client(node)
                    .publish(BROADCAST_CHANNEL.into(), payload.into_bytes())
                    .await
            }
            Api::Outbox(_) => Err("--outbox-postgres runs the unicast scenario only".into()),
        }
    }

    /// IsOnline for `users`; returns how many were online.
    pub async fn is_online(&self, node: usize, users: Vec<String>) -> Result<usize, String> {
        let (mut c, key) = self.client(node);
        let r = c
            .is_online(Self::req(IsOnlineRequest { user_ids: users }, key))
            .await
            .map_err(|s| format!("IsOnline: {}: {}", s.code(), s.message()))?;
        Ok(r.into_inner().users.iter().filter(|u| u.online).count())
    }

    pub async fn unread(&self, node: usize, user: String) -> Result<u64, String> {
        let (mut c, key) = self.client(node);
        let r = c
            .unread_count(Self::req(
                UnreadCountRequest {
                    user_id: user,
                    ..Default::default()
                },
                key,
            ))
            .await
            .map_err(|s| format!("UnreadCount: {}: {}", s.code(), s.message()))?;
        Ok(r.into_inner().count)
    }
}

/// A bench payload of about `bytes` bytes: `{"seq":N,"t":T,"p":"xxxx"}`.
pub fn payload(seq: u64, t_ns: u64, bytes: usize) -> String {
    let mut s = format!("{{\"seq\":{seq},\"t\":{t_ns},\"p\":\"");
    let pad = bytes.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

#[cfg(test)]
mod tests {
    use super::payload;

    #[test]
    fn payload_has_the_requested_size_and_is_json() {
        let p = payload(12345, 67890, 100);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["seq"], 12345);
        assert_eq!(v["t"], 67890);
        // Too small a size still gives valid JSON.
        assert!(serde_json::from_str::<serde_json::Value>(&payload(1, 2, 5)).is_ok());
    }
}

/// A POST to a bench-protocol node: the reply body of a 200, or what went
/// wrong (the start of any other reply's body).
async fn post_ok(pool: &HttpPool, path: &str, body: String) -> Result<Vec<u8>, String> {
    match pool.request(Method::POST, path, body).await {
        Ok((200, b)) => Ok(b.to_vec()),
        Ok((s, b)) => Err(format!(
            "POST {path}: HTTP {s}: {}",
            String::from_utf8_lossy(&b)
                .chars()
                .take(300)
                .collect::<String>()
        )),
        Err(e) => Err(format!("POST {path}: {e}")),
    }
}
