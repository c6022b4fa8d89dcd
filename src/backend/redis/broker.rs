//! [`Broker`] on Redis pub/sub: a node subscribes to a user's channel
//! while it holds one of the user's connections (the registrar does the
//! subscribing); events are published in the format of [`codec`], with
//! `PUBLISH` on one server and `SPUBLISH` (sharded pub/sub) on a cluster.

use super::{codec, RedisBackend};
use crate::backend::{Broker, Event};
use crate::error::Result;
use crate::protocol::Frame;
use async_trait::async_trait;

#[async_trait]
impl Broker for RedisBackend {
    async fn subscribe(&self, user: &str) -> Result<()> {
        self.registrar.sync(user).await
    }

    async fn unsubscribe(&self, user: &str) -> Result<()> {
        self.registrar.sync_later(user);
        Ok(())
    }

    async fn publish(&self, events: Vec<Event>) -> Result<Vec<bool>> {
        if events.is_empty() {
            return Ok(Vec::new()); // an empty pipeline is not a valid request
        }
        // On a cluster every channel is a sharded one (the broadcast
        // channel too): SPUBLISH goes to the primary of the channel's slot
        // and reaches only the nodes subscribed there.
        let publish = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        let mut pipe = redis::pipe();
        for e in &events {
            pipe.cmd(publish)
                .arg(codec::channel(e))
                .arg(codec::Payload(e));
        }
        let mut conn = self.conn.clone();
        // PUBLISH answers with the number of subscribed nodes.
        let receivers: Vec<i64> = pipe.query_async(&mut conn).await?;
        Ok(receivers.into_iter().map(|n| n > 0).collect())
    }

    async fn broadcast(&self, frame: Frame) -> Result<()> {
        self.publish(vec![Event::Broadcast { frame }])
            .await
            .map(|_| ())
    }
}
