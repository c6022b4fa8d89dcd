//! Redis-backed broker, presence and inbox for a cluster of nodes.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::node::Node;
use std::sync::Arc;

pub async fn node(_cfg: Config, _url: &str) -> Result<Arc<Node>> {
    Err(Error::Unavailable("the Redis backend is not built yet".into()))
}
