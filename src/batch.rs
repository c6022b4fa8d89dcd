//! `SendBatch`: many independent sends in one call, each checked and sent
//! as a `SendToUser` of its own, each with a result of its own.
//!
//! Why it is cheaper than one call per message: the stored items' messages
//! go to the inbox in one [`Inbox::append_batch`] (on Redis: one pipeline
//! of the append scripts, one round trip per Redis node for the whole
//! batch), and the live-only items' events in one [`Broker::publish`] (one
//! pipelined PUBLISH per event). Only keyed items pay their idempotency
//! check (run concurrently, so pipelined on one connection) before that.
//!
//! Whole-call limits ([`MAX_BATCH_ITEMS`], [`MAX_BATCH_RECIPIENTS`],
//! [`MAX_BATCH_BYTES`]) bound what one call makes the node hold beyond the
//! decoded request; a batch over one is refused as a whole, before any
//! effect, and counted in `herald_batch_refused_total{reason}`.
//!
//! [`Inbox::append_batch`]: crate::backend::Inbox::append_batch
//! [`Broker::publish`]: crate::backend::Broker::publish

use crate::backend::{Claim, ClaimScope, IdemKey, NewMessage};
use crate::error::{Error, Result};
use crate::node::{live_deliveries, live_events, Delivery, Node, SendToUser};
use crate::protocol::{self, Frame};
use futures_util::future::join_all;

/// Items per `SendBatch` call.
pub const MAX_BATCH_ITEMS: usize = 1000;
/// Recipients summed over a batch's items.
pub const MAX_BATCH_RECIPIENTS: usize = 10_000;
/// `payload_json` and `topic` bytes summed over a batch's items.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// One item's outcome: its deliveries, or why it was not sent.
pub type ItemResult = Result<Vec<Delivery>>;

/// An item that passed its checks, with what sending it needs.
struct Checked<'a> {
    index: usize,
    send: &'a SendToUser<'a>,
    idem: Option<IdemKey<'a>>,
}

fn refuse(reason: &'static str, msg: String) -> Error {
    metrics::counter!("herald_batch_refused_total", "reason" => reason).increment(1);
    Error::invalid(msg)
}

/// The whole-call limits.
fn check_batch(items: &[SendToUser<'_>]) -> Result<()> {
    if items.is_empty() {
        return Err(refuse("empty", "items must hold at least one item".into()));
    }
    if items.len() > MAX_BATCH_ITEMS {
        return Err(refuse(
            "items",
            format!(
                "items has {} entries; at most {MAX_BATCH_ITEMS} per call",
                items.len()
            ),
        ));
    }
    let recipients: usize = items.iter().map(|i| i.users.len()).sum();
    if recipients > MAX_BATCH_RECIPIENTS {
        return Err(refuse(
            "recipients",
            format!("the items name {recipients} recipients in all; at most {MAX_BATCH_RECIPIENTS} per call"),
        ));
    }
    let bytes: usize = items
        .iter()
        .map(|i| i.payload_json.len() + i.topic.len())
        .sum();
    if bytes > MAX_BATCH_BYTES {
        return Err(refuse(
            "bytes",
            format!("the items' payloads and topics are {bytes} bytes in all; at most {MAX_BATCH_BYTES} per call"),
        ));
    }
    Ok(())
}

impl Node {
    /// Sends every item as [`Node::send_to_user`] would, with one result per
    /// item in order. `Err` only for a batch over a whole-call limit.
    pub async fn send_batch(&self, items: &[SendToUser<'_>]) -> Result<Vec<ItemResult>> {
        check_batch(items)?;
        let mut results: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        // Fingerprints first: the keys borrow them.
        let prints: Vec<String> = items.iter().map(SendToUser::fingerprint).collect();
        let mut ok: Vec<Checked<'_>> = Vec::with_capacity(items.len());
        for (index, (send, fp)) in items.iter().zip(&prints).enumerate() {
            match self.check_send(send, fp) {
                Ok(idem) => ok.push(Checked { index, send, idem }),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        // All or nothing per item, as for SendToUser: a key reused for
        // another request refuses its item before any effect.
        let conflicts = join_all(ok.iter().map(|c| self.refuse_reused(c.send.users, c.idem))).await;
        let mut stored = Vec::new();
        let mut live = Vec::new();
        for (c, r) in ok.into_iter().zip(conflicts) {
            match r {
                Err(e) => results[c.index] = Some(Err(e)),
                Ok(()) if c.send.transient => live.push(c),
                Ok(()) => stored.push(c),
            }
        }
        let ts = protocol::now_ms();
        for (index, r) in self.batch_stored(&stored, ts).await {
            results[index] = Some(r);
        }
        for (index, r) in self.batch_live(&live, ts).await {
            results[index] = Some(r);
        }
        let results: Vec<ItemResult> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Backend("batch item left unsent".into()))))
            .collect();
        self.count_batch(&results, items);
        Ok(results)
    }

    /// The stored items: one append for all of them.
    async fn batch_stored(&self, items: &[Checked<'_>], ts: u64) -> Vec<(usize, ItemResult)> {
        if items.is_empty() {
            return Vec::new();
        }
        let batch: Vec<(&[String], NewMessage<'_>)> = items
            .iter()
            .map(|c| {
                (
                    c.send.users,
                    NewMessage {
                        topic: c.send.topic,
                        payload_json: c.send.payload_json,
                        ts,
                        idempotency: c.idem,
                    },
                )
            })
            .collect();
        match self.backend.inbox.append_batch(&batch).await {
            Ok(per_item) => items
                .iter()
                .zip(per_item)
                .map(|(c, r)| (c.index, r.map(|a| self.stored_deliveries(c.send.users, a))))
                .collect(),
            Err(e) => items.iter().map(|c| (c.index, Err(e.clone()))).collect(),
        }
    }

    /// The live-only items: their claims (keyed items only, concurrently),
    /// then one publish of every event.
    async fn batch_live(&self, items: &[Checked<'_>], ts: u64) -> Vec<(usize, ItemResult)> {
        if items.is_empty() {
            return Vec::new();
        }
        let ids: Vec<String> = items.iter().map(|_| protocol::live_id()).collect();
        let claims = join_all(items.iter().zip(&ids).map(|(c, id)| async move {
            match c.idem {
                None => Ok(vec![Claim::New; c.send.users.len()]),
                Some(k) => {
                    let scopes: Vec<ClaimScope> =
                        c.send.users.iter().map(|u| ClaimScope::User(u)).collect();
                    self.backend.idempotency.claim(&scopes, k, id).await
                }
            }
        }))
        .await;
        let mut out = Vec::with_capacity(items.len());
        let mut events = Vec::new();
        // Per item that publishes: its claims, and where its events start.
        let mut sending = Vec::new();
        for ((c, id), claims) in items.iter().zip(&ids).zip(claims) {
            let claims = match claims {
                Ok(v) => v,
                Err(e) => {
                    out.push((c.index, Err(e)));
                    continue;
                }
            };
            let frame: Frame =
                protocol::message_frame(id, c.send.topic, c.send.payload_json, ts, true).into();
            let first = events.len();
            match live_events(c.send.users, &claims, &frame) {
                Ok(mine) => events.extend(mine),
                Err(e) => {
                    out.push((c.index, Err(e)));
                    continue;
                }
            }
            sending.push((c, id, claims, first));
        }
        let online = match self.backend.broker.publish(events).await {
            Ok(v) => v,
            Err(e) => {
                for (c, ..) in &sending {
                    out.push((c.index, Err(e.clone())));
                }
                return out;
            }
        };
        for (c, id, claims, first) in sending {
            let on = online[first..].iter().copied();
            let deliveries = live_deliveries(c.send.users, claims, &id, on);
            out.push((c.index, Ok(deliveries)));
        }
        out
    }

    /// The same counters as SendToUser's, plus items per outcome.
    fn count_batch(&self, results: &[ItemResult], items: &[SendToUser<'_>]) {
        let (mut stored, mut transient, mut replayed, mut failed) = (0u64, 0u64, 0u64, 0u64);
        for (r, item) in results.iter().zip(items) {
            match r {
                Ok(ds) => {
                    let pushed = ds.iter().filter(|d| !d.replayed).count() as u64;
                    replayed += ds.len() as u64 - pushed;
                    if item.transient {
                        transient += pushed;
                    } else {
                        stored += pushed;
                    }
                }
                Err(_) => failed += 1,
            }
        }
        metrics::counter!("herald_messages_pushed_total", "kind" => "stored").increment(stored);
        metrics::counter!("herald_messages_pushed_total", "kind" => "transient")
            .increment(transient);
        if replayed > 0 {
            metrics::counter!("herald_idempotent_replays_total").increment(replayed);
        }
        metrics::counter!("herald_batch_items_total", "result" => "ok")
            .increment(results.len() as u64 - failed);
        metrics::counter!("herald_batch_items_total", "result" => "error").increment(failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item<'a>(users: &'a [String], payload: &'a str) -> SendToUser<'a> {
        SendToUser {
            users,
            topic: "",
            payload_json: payload,
            transient: false,
            idempotency_key: "",
        }
    }

    #[test]
    fn whole_call_limits() {
        let one = vec!["u".to_string()];
        assert!(check_batch(&[]).is_err());
        let ok: Vec<_> = (0..MAX_BATCH_ITEMS).map(|_| item(&one, "1")).collect();
        assert!(check_batch(&ok).is_ok());
        let over: Vec<_> = (0..=MAX_BATCH_ITEMS).map(|_| item(&one, "1")).collect();
        assert!(check_batch(&over)
            .unwrap_err()
            .to_string()
            .contains("at most 1000"));
        let many: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let wide: Vec<_> = (0..11).map(|_| item(&many, "1")).collect();
        assert!(check_batch(&wide)
            .unwrap_err()
            .to_string()
            .contains("recipients"));
        let big = format!("\"{}\"", "x".repeat(60_000));
        let heavy: Vec<_> = (0..18).map(|_| item(&one, &big)).collect();
        assert!(check_batch(&heavy)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
    }
}
