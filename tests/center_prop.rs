//! A property test of the message center: random sequences of send,
//! read(ids), read(up_to), unread(ids), delete(ids), delete(all), trims (a
//! small --inbox-max-messages makes sends trim) and reconnects with and
//! without `since`, run against both backends and a plain model; after
//! every step the count, the full list (order, read flags) and the
//! resume must match the model. Bounded: 12 cases of up to 28 steps on
//! each backend. Failing inputs are kept in
//! `tests/center_prop.proptest-regressions` and replayed first.

#[macro_use]
mod common;
use common::*;
use herald::proto::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

const MAX_MESSAGES: usize = 6;

#[derive(Clone, Debug)]
enum Op {
    Send,
    Read(Vec<usize>),
    ReadUpTo(Option<usize>),
    Unread(Vec<usize>),
    Delete(Vec<usize>),
    DeleteAll,
    Resume(usize),
    Connect,
}

fn op() -> impl Strategy<Value = Op> {
    let idx = proptest::collection::vec(0usize..64, 1..4);
    prop_oneof![
        5 => Just(Op::Send),
        3 => idx.clone().prop_map(Op::Read),
        2 => proptest::option::of(0usize..64).prop_map(Op::ReadUpTo),
        3 => idx.clone().prop_map(Op::Unread),
        2 => idx.prop_map(Op::Delete),
        1 => Just(Op::DeleteAll),
        1 => (0usize..64).prop_map(Op::Resume),
        1 => Just(Op::Connect),
    ]
}

/// What the inbox should hold: (id, read), oldest first; the newest id
/// trimmed (not deleted) away.
#[derive(Default)]
struct Model {
    kept: Vec<(String, bool)>,
    floor: Option<String>,
}

fn key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

impl Model {
    fn unread(&self) -> u64 {
        self.kept.iter().filter(|(_, r)| !r).count() as u64
    }
}

async fn run(node: &TestNode, ops: Vec<Op>) {
    let mut c = node.client().await;
    let u = uid("prop");
    let mut m = Model::default();
    let mut sent: Vec<String> = Vec::new();
    let pick = |sent: &[String], is: &[usize]| -> Vec<String> {
        is.iter().map(|i| sent[i % sent.len()].clone()).collect()
    };
    for op in ops {
        match &op {
            Op::Send => {
                let id = send(&mut c, &[&u], "1").await.deliveries[0]
                    .message_id
                    .clone();
                sent.push(id.clone());
                m.kept.push((id, false));
                while m.kept.len() > MAX_MESSAGES {
                    m.floor = Some(m.kept.remove(0).0);
                }
            }
            _ if sent.is_empty() => continue,
            Op::Read(is) | Op::Unread(is) => {
                let ids = pick(&sent, is);
                let read = matches!(op, Op::Read(_));
                let unread = if read {
                    c.mark_read(MarkReadRequest {
                        user_id: u.clone(),
                        message_ids: ids.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .unread
                } else {
                    c.mark_unread(MarkUnreadRequest {
                        user_id: u.clone(),
                        message_ids: ids.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .unread
                };
                for (id, r) in m.kept.iter_mut() {
                    if ids.contains(id) {
                        *r = read;
                    }
                }
                assert_eq!(unread, m.unread(), "{op:?}");
            }
            Op::ReadUpTo(i) => {
                let target = i.map(|i| sent[i % sent.len()].clone());
                let unread = c
                    .mark_read(MarkReadRequest {
                        user_id: u.clone(),
                        up_to_message_id: target.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .unread;
                for (id, r) in m.kept.iter_mut() {
                    if target.as_ref().is_none_or(|t| key(id) <= key(t)) {
                        *r = true;
                    }
                }
                assert_eq!(unread, m.unread(), "{op:?}");
            }
            Op::Delete(is) => {
                let ids = pick(&sent, is);
                let r = c
                    .delete_messages(DeleteMessagesRequest {
                        user_id: u.clone(),
                        message_ids: ids.clone(),
                        all: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let before = m.kept.len();
                m.kept.retain(|(id, _)| !ids.contains(id));
                assert_eq!(r.deleted as usize, before - m.kept.len(), "{op:?}");
                assert_eq!(r.unread, m.unread(), "{op:?}");
            }
            Op::DeleteAll => {
                let r = c
                    .delete_messages(DeleteMessagesRequest {
                        user_id: u.clone(),
                        all: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.deleted as usize, m.kept.len());
                m.kept.clear();
            }
            Op::Resume(i) => {
                let since = sent[i % sent.len()].clone();
                let (mut ws, w) = node.connect_since(&u, Some(&since)).await;
                let complete = m.floor.as_ref().is_none_or(|f| key(&since) >= key(f));
                assert_eq!(w["resumed"], complete, "{op:?}");
                let want: Vec<&String> = m
                    .kept
                    .iter()
                    .map(|(id, _)| id)
                    .filter(|id| key(id) > key(&since))
                    .collect();
                assert_eq!(w["replay"], want.len(), "{op:?}");
                assert_eq!(w["unread"], m.unread());
                for id in want {
                    assert_eq!(ws.next_json().await["id"], id.as_str());
                }
            }
            Op::Connect => {
                let (mut ws, w) = node.connect(&u).await;
                assert_eq!(w["unread"], m.unread());
                let want: Vec<&String> = m
                    .kept
                    .iter()
                    .filter(|(_, r)| !r)
                    .map(|(id, _)| id)
                    .collect();
                assert_eq!(w["replay"], want.len(), "{op:?}");
                for id in want {
                    assert_eq!(ws.next_json().await["id"], id.as_str());
                }
            }
        }
        // After every step: the count and the whole list.
        assert_eq!(unread(&mut c, &u).await, m.unread(), "after {op:?}");
        let l = c
            .list_messages(ListMessagesRequest {
                user_id: u.clone(),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<(String, bool)> = l
            .messages
            .iter()
            .map(|x| (x.message_id.clone(), x.read))
            .collect();
        let want: Vec<(String, bool)> = m.kept.iter().rev().cloned().collect();
        assert_eq!(got, want, "list after {op:?}");
        assert_eq!(l.unread, m.unread());
    }
}

fn property(b: Backend) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut args = args();
    args.inbox_max_messages = MAX_MESSAGES;
    let node = rt.block_on(TestNode::start_on(b, args));
    let mut config = Config::with_cases(12);
    config.max_shrink_iters = 64;
    config.source_file = Some(file!());
    config.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )));
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(op(), 1..28), |ops| {
        rt.block_on(run(&node, ops));
        Ok(())
    });
    rt.block_on(node.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn model_memory() {
    property(Backend::Memory);
}

#[test]
fn model_redis() {
    property(Backend::Redis);
}
