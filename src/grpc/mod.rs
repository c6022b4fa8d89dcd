//! `herald.v1.PushService` over tonic: a thin edge that converts protobuf
//! messages to [`Node`] calls, counts and times every RPC, and maps
//! [`crate::error::Error`] to precise status codes.

pub(crate) mod limits;

use crate::apikey::{Caller, Scopes};
use crate::center::{Done, Entry, ListMessages, Request as Center};
use crate::error::Error;
use crate::node::{Node, SendToUser};
use crate::proto::push_service_server::PushService;
use crate::proto::*;
use crate::protocol;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The full name of the service, as `rpc` and `rpc.refused` lines write
/// method names (`herald.v1.PushService/SendToUser`).
const SERVICE: &str = "herald.v1.PushService";

pub struct PushApi {
    node: Arc<Node>,
    /// The outbox consumer's figures (state `off` without one).
    outbox: Arc<crate::outbox::Status>,
}

impl PushApi {
    pub fn new(node: Arc<Node>, outbox: Arc<crate::outbox::Status>) -> Self {
        PushApi { node, outbox }
    }
}

impl PushApi {
    /// Runs one RPC body inside a span naming the RPC and this node,
    /// recording its count, outcome and latency, and logging it (an `rpc`
    /// line at DEBUG; `recipients`: the users it names, if it names any).
    ///
    /// The caller's key must cover `needed` (PERMISSION_DENIED otherwise,
    /// before the body runs, logged as `rpc.refused`); its name labels the
    /// count and the span.
    async fn observed<T>(
        &self,
        rpc: &'static str,
        needed: Scopes,
        caller: Caller,
        recipients: Option<usize>,
        body: impl Future<Output = crate::error::Result<T>>,
    ) -> Result<Response<T>, Status> {
        let span =
            tracing::info_span!("rpc", rpc, node = %self.node.cfg.node_id, key = %caller.name);
        let start = Instant::now();
        // Errors are logged (by their conversion to a status) inside the span.
        let result = match caller.check(rpc, needed) {
            Ok(()) => {
                async { body.await.map(Response::new).map_err(Status::from) }
                    .instrument(span)
                    .await
            }
            Err(denied) => {
                crate::telemetry::rpc_refused(
                    &self.node.cfg.node_id,
                    &format!("{SERVICE}/{rpc}"),
                    &caller.name,
                    "PermissionDenied",
                    "scope",
                    None,
                );
                Err(denied)
            }
        };
        let code = match &result {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        tracing::debug!(
            parent: None,
            event = "rpc",
            node = &*self.node.cfg.node_id,
            method = %format_args!("{SERVICE}/{rpc}"),
            key = &*caller.name,
            recipients = recipients.map(|n| n as u64),
            code = code.as_str(),
            micros = start.elapsed().as_micros() as u64,
            "gRPC call"
        );
        metrics::counter!("herald_rpc_total", "rpc" => rpc, "code" => code, "key" => caller.name.to_string())
            .increment(1);
        metrics::histogram!("herald_rpc_duration_seconds", "rpc" => rpc)
            .record(start.elapsed().as_secs_f64());
        result
    }
}

#[tonic::async_trait]
impl PushService for PushApi {
    async fn send_to_user(
        &self,
        req: Request<SendToUserRequest>,
    ) -> Result<Response<SendToUserResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let recipients = Some(r.user_ids.len());
        self.observed("SendToUser", Scopes::SEND, caller, recipients, async {
            let deliveries = self
                .node
                .send_to_user(SendToUser {
                    users: &r.user_ids,
                    topic: &r.topic,
                    payload_json: &r.payload_json,
                    transient: r.transient,
                    idempotency_key: &r.idempotency_key,
                })
                .await?;
            Ok(SendToUserResponse {
                deliveries: deliveries.into_iter().map(delivery).collect(),
            })
        })
        .await
    }

    async fn send_batch(
        &self,
        req: Request<SendBatchRequest>,
    ) -> Result<Response<SendBatchResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let recipients = Some(r.items.iter().map(|i| i.user_ids.len()).sum());
        self.observed("SendBatch", Scopes::SEND, caller, recipients, async {
            let items: Vec<SendToUser<'_>> = r
                .items
                .iter()
                .map(|i| SendToUser {
                    users: &i.user_ids,
                    topic: &i.topic,
                    payload_json: &i.payload_json,
                    transient: i.transient,
                    idempotency_key: &i.idempotency_key,
                })
                .collect();
            let results = self.node.send_batch(&items).await?;
            Ok(SendBatchResponse {
                results: results
                    .into_iter()
                    .map(|r| match r {
                        Ok(ds) => SendBatchResult {
                            deliveries: ds.into_iter().map(delivery).collect(),
                            error_code: 0,
                            error_message: String::new(),
                        },
                        // The status SendToUser would have answered (logged
                        // as it would be).
                        Err(e) => {
                            let st = Status::from(e);
                            SendBatchResult {
                                deliveries: Vec::new(),
                                error_code: st.code() as i32,
                                error_message: st.message().to_string(),
                            }
                        }
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn broadcast(
        &self,
        req: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("Broadcast", Scopes::SEND, caller, None, async {
            let (message_id, replayed) = self
                .node
                .broadcast(&r.topic, &r.payload_json, &r.idempotency_key)
                .await?;
            Ok(BroadcastResponse {
                message_id,
                replayed,
            })
        })
        .await
    }

    async fn is_online(
        &self,
        req: Request<IsOnlineRequest>,
    ) -> Result<Response<IsOnlineResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let recipients = Some(r.user_ids.len());
        self.observed("IsOnline", Scopes::READ, caller, recipients, async {
            let counts = self.node.is_online(&r.user_ids).await?;
            Ok(IsOnlineResponse {
                users: r
                    .user_ids
                    .into_iter()
                    .zip(counts)
                    .map(|(user_id, n)| UserPresence {
                        user_id,
                        online: n > 0,
                        connections: n,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn unread_count(
        &self,
        req: Request<UnreadCountRequest>,
    ) -> Result<Response<UnreadCountResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("UnreadCount", Scopes::READ, caller, Some(1), async {
            Ok(UnreadCountResponse {
                count: self.node.unread_count(&r.user_id, &r.topic_prefix).await?,
            })
        })
        .await
    }

    async fn mark_read(
        &self,
        req: Request<MarkReadRequest>,
    ) -> Result<Response<MarkReadResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("MarkRead", Scopes::SEND, caller, Some(1), async {
            let req = match (r.message_ids.is_empty(), r.up_to_message_id.is_empty()) {
                (true, _) => Center::ReadUpTo(&r.up_to_message_id),
                (false, true) => Center::SetRead {
                    ids: &r.message_ids,
                    read: true,
                },
                (false, false) => {
                    return Err(Error::invalid(
                        "give either up_to_message_id or message_ids, not both",
                    ))
                }
            };
            Ok(
                match self.node.center(&r.user_id, Entry::Backend, req).await? {
                    Done::Unread(unread) => MarkReadResponse {
                        unread,
                        changed_message_ids: Vec::new(),
                    },
                    done => {
                        let c = changed(done)?;
                        MarkReadResponse {
                            unread: c.unread,
                            changed_message_ids: c.ids.iter().map(|i| i.to_string()).collect(),
                        }
                    }
                },
            )
        })
        .await
    }

    async fn list_messages(
        &self,
        req: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("ListMessages", Scopes::SEND, caller, Some(1), async {
            let req = Center::List(ListMessages {
                cursor: &r.cursor,
                oldest_first: r.oldest_first,
                limit: r.limit,
                unread_only: r.unread_only,
                topic_prefix: &r.topic_prefix,
            });
            let Done::Page(page) = self.node.center(&r.user_id, Entry::Backend, req).await? else {
                return Err(Error::Backend("a page request answered no page".into()));
            };
            let messages = page
                .messages
                .iter()
                .map(|m| {
                    let f = protocol::parse_stored_frame(&m.frame).map_err(|e| {
                        Error::Backend(format!("stored frame {} does not parse: {e}", m.id))
                    })?;
                    Ok(StoredMessage {
                        message_id: m.id.to_string(),
                        topic: f.topic,
                        payload_json: f.data.get().to_string(),
                        timestamp_ms: f.ts,
                        read: m.read,
                    })
                })
                .collect::<crate::error::Result<Vec<_>>>()?;
            Ok(ListMessagesResponse {
                messages,
                next_cursor: page.next.map(|i| i.to_string()).unwrap_or_default(),
                unread: page.unread,
            })
        })
        .await
    }

    async fn mark_unread(
        &self,
        req: Request<MarkUnreadRequest>,
    ) -> Result<Response<MarkUnreadResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("MarkUnread", Scopes::SEND, caller, Some(1), async {
            let req = Center::SetRead {
                ids: &r.message_ids,
                read: false,
            };
            let c = changed(self.node.center(&r.user_id, Entry::Backend, req).await?)?;
            Ok(MarkUnreadResponse {
                unread: c.unread,
                changed_message_ids: c.ids.iter().map(|i| i.to_string()).collect(),
            })
        })
        .await
    }

    async fn delete_messages(
        &self,
        req: Request<DeleteMessagesRequest>,
    ) -> Result<Response<DeleteMessagesResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("DeleteMessages", Scopes::SEND, caller, Some(1), async {
            let req = match (r.all, r.message_ids.is_empty()) {
                (true, true) => Center::Delete(None),
                (true, false) => {
                    return Err(Error::invalid("give either message_ids or all, not both"))
                }
                (false, true) => {
                    return Err(Error::invalid(
                        "message_ids must name at least one message (or set all)",
                    ))
                }
                (false, false) => Center::Delete(Some(&r.message_ids)),
            };
            let c = changed(self.node.center(&r.user_id, Entry::Backend, req).await?)?;
            Ok(DeleteMessagesResponse {
                unread: c.unread,
                deleted_message_ids: c.ids.iter().map(|i| i.to_string()).collect(),
                deleted: c.deleted,
            })
        })
        .await
    }

    async fn disconnect_user(
        &self,
        req: Request<DisconnectUserRequest>,
    ) -> Result<Response<DisconnectUserResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.observed("DisconnectUser", Scopes::SEND, caller, Some(1), async {
            Ok(DisconnectUserResponse {
                closed: self.node.disconnect_user(&r.user_id, &r.reason).await?,
            })
        })
        .await
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let caller = Caller::of(&req);
        self.observed("Stats", Scopes::READ, caller, None, async {
            let s = self.node.stats().await?;
            let n = s.node;
            let mut nodes: Vec<NodeStats> = s
                .cluster
                .nodes
                .iter()
                .map(|i| NodeStats {
                    node_id: i.node_id.clone(),
                    connections: i.connections,
                    users: i.users,
                    uptime_seconds: i.uptime_seconds,
                    messages_delivered: i.messages_delivered,
                    broker_events_received: i.broker_events_received,
                })
                .collect();
            // This node's own entry carries its full local figures.
            let me = NodeStats {
                node_id: n.node_id.clone(),
                connections: n.connections,
                users: n.users,
                uptime_seconds: n.uptime_seconds,
                messages_delivered: n.messages_delivered,
                broker_events_received: n.broker_events_received,
            };
            match nodes.iter_mut().find(|x| x.node_id == me.node_id) {
                Some(x) => *x = me.clone(),
                None => nodes.push(me.clone()),
            }
            nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            let o = self.outbox.snapshot();
            Ok(StatsResponse {
                outbox: Some(OutboxStats {
                    state: o.state.name().to_string(),
                    rows_delivered: o.delivered,
                    rows_dead_lettered: o.dead_lettered,
                    send_failures: o.send_failures,
                    lag_ms: o.lag_ms,
                }),
                online_users: s.cluster.online_users,
                connections: nodes.iter().map(|x| x.connections).sum(),
                node: Some(me),
                nodes,
            })
        })
        .await
    }
}

fn delivery(d: crate::node::Delivery) -> Delivery {
    Delivery {
        user_id: d.user_id,
        message_id: d.message_id,
        online: d.online,
        replayed: d.replayed,
    }
}

/// The change a message-center call made (what every call but a page and
/// a read-cursor move answers).
fn changed(done: Done) -> crate::error::Result<crate::backend::Changed> {
    match done {
        Done::Changed(c) => Ok(c),
        other => Err(Error::Backend(format!("a change answered {other:?}"))),
    }
}
