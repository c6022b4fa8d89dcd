//! `herald send`: push a message from a shell, through a node's gRPC API.

use crate::config::SendArgs;
use crate::proto::push_service_client::PushServiceClient;
use crate::proto::{BroadcastRequest, SendToUserRequest};
use std::process::ExitCode;
use tonic::metadata::MetadataValue;

pub async fn send(args: SendArgs) -> ExitCode {
    let mut client = match PushServiceClient::connect(args.grpc.clone()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald send: cannot reach {}: {e}", args.grpc);
            return ExitCode::from(1);
        }
    };
    let key = args.api_key.clone();
    let result = if args.broadcast {
        client
            .broadcast(with_key(
                &key,
                BroadcastRequest {
                    topic: args.topic.clone(),
                    payload_json: args.payload_json.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| println!("broadcast {}", r.into_inner().message_id))
    } else {
        client
            .send_to_user(with_key(
                &key,
                SendToUserRequest {
                    user_ids: args.users.clone(),
                    topic: args.topic.clone(),
                    payload_json: args.payload_json.clone(),
                    transient: args.transient,
                    ..Default::default()
                },
            ))
            .await
            .map(|r| {
                for d in r.into_inner().deliveries {
                    println!(
                        "{}\t{}\t{}",
                        d.user_id,
                        d.message_id,
                        if d.online { "online" } else { "offline" }
                    );
                }
            })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => {
            eprintln!("herald send: {:?}: {}", s.code(), s.message());
            ExitCode::from(1)
        }
    }
}

/// A request carrying `authorization: Bearer <key>` when a key is given.
pub fn with_key<T>(key: &Option<String>, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(k) = key {
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {k}")) {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}
