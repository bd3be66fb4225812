//! Subscriptions of the whole sandbox. They are per sandbox, not per connection (DECISIONS #13):
//! every connection subscribed to a process, terminal or directory gets its events; a
//! connection's subscriptions end with the connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use futures_util::future::join_all;

use crate::lock;
use crate::outbox::Outbox;
use crate::rpc;

/// What a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Topic {
    Stdout(String),
    Stderr(String),
    ProcessExit(String),
    TerminalData(String),
    TerminalExit(String),
    /// Direct children of this (resolved) directory.
    Watch(PathBuf),
    /// The port scan; every subscription gets its own scans.
    OpenPorts,
}

impl Topic {
    /// The service whose `<service>_subscription` method carries the notifications.
    fn service(&self) -> &'static str {
        match self {
            Topic::Stdout(_) | Topic::Stderr(_) | Topic::ProcessExit(_) => "process",
            Topic::TerminalData(_) | Topic::TerminalExit(_) => "terminal",
            Topic::Watch(_) => "filesystem",
            Topic::OpenPorts => "codeSnippet",
        }
    }
}

/// Identifies one websocket connection.
pub(crate) type ConnectionId = u64;

struct Subscriber {
    connection: ConnectionId,
    topic: Topic,
    outbox: Outbox,
}

#[derive(Default)]
pub(crate) struct Hub {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Subscriber>,
    by_topic: HashMap<Topic, Vec<String>>,
}

impl Hub {
    /// Registers a subscription. The caller must already have queued the subscribe response on
    /// `outbox`, so that no notification can overtake it.
    pub(crate) fn insert(
        &self,
        id: String,
        connection: ConnectionId,
        topic: Topic,
        outbox: Outbox,
    ) {
        let mut inner = lock(&self.inner);
        inner
            .by_topic
            .entry(topic.clone())
            .or_default()
            .push(id.clone());
        inner.by_id.insert(
            id,
            Subscriber {
                connection,
                topic,
                outbox,
            },
        );
    }

    /// Ends one subscription of `connection`; `None` if it has no subscription `id`.
    pub(crate) fn remove(&self, connection: ConnectionId, id: &str) -> Option<Topic> {
        let mut inner = lock(&self.inner);
        if inner.by_id.get(id)?.connection != connection {
            return None;
        }
        inner.detach(id)
    }

    /// Ends every subscription of `connection` and returns their topics.
    pub(crate) fn remove_connection(&self, connection: ConnectionId) -> Vec<Topic> {
        let mut inner = lock(&self.inner);
        let ids: Vec<String> = inner
            .by_id
            .iter()
            .filter(|(_, subscriber)| subscriber.connection == connection)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| inner.detach(id)).collect()
    }

    /// Sends an event (already-encoded JSON) to every subscriber of `topic`, waiting until each
    /// connection has room for it: this wait is what throttles a chatty process.
    pub(crate) async fn publish(&self, topic: &Topic, result: &str) {
        let targets: Vec<(String, Outbox)> = {
            let inner = lock(&self.inner);
            let Some(ids) = inner.by_topic.get(topic) else {
                return;
            };
            ids.iter()
                .filter_map(|id| Some((id.clone(), inner.by_id.get(id)?.outbox.clone())))
                .collect()
        };
        let service = topic.service();
        // Concurrently, so a stalled connection delays the others by one event at most.
        join_all(
            targets
                .iter()
                .map(|(id, outbox)| outbox.send(rpc::notification(service, id, result))),
        )
        .await;
    }

    /// Sends an event to one subscription; `false` once that subscription or its connection is gone.
    pub(crate) async fn send_to(&self, id: &str, result: &str) -> bool {
        let target = lock(&self.inner)
            .by_id
            .get(id)
            .map(|subscriber| (subscriber.topic.service(), subscriber.outbox.clone()));
        match target {
            Some((service, outbox)) => outbox
                .send(rpc::notification(service, id, result))
                .await
                .is_ok(),
            None => false,
        }
    }
}

impl Inner {
    fn detach(&mut self, id: &str) -> Option<Topic> {
        let subscriber = self.by_id.remove(id)?;
        if let Some(ids) = self.by_topic.get_mut(&subscriber.topic) {
            ids.retain(|other| other != id);
            if ids.is_empty() {
                self.by_topic.remove(&subscriber.topic);
            }
        }
        Some(subscriber.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_every_connection_until_it_leaves() {
        let hub = Hub::default();
        let (first, mut first_queue) = Outbox::new();
        let (second, mut second_queue) = Outbox::new();
        let topic = Topic::Stdout("p".into());
        hub.insert("0xa".into(), 1, topic.clone(), first);
        hub.insert("0xb".into(), 2, topic.clone(), second);
        hub.publish(&topic, "1").await;
        assert!(
            first_queue
                .recv()
                .await
                .unwrap()
                .text
                .contains(r#""subscription":"0xa","result":1"#)
        );
        assert!(
            second_queue
                .recv()
                .await
                .unwrap()
                .text
                .contains(r#""method":"process_subscription""#)
        );

        assert_eq!(hub.remove(2, "0xa"), None, "only the owner may unsubscribe");
        assert_eq!(hub.remove_connection(1), vec![topic.clone()]);
        hub.publish(&topic, "2").await;
        assert!(first_queue.try_recv().is_err());
        assert!(
            second_queue
                .recv()
                .await
                .unwrap()
                .text
                .contains(r#""result":2"#)
        );
        assert!(!hub.send_to("0xa", "3").await);
        assert!(hub.send_to("0xb", "3").await);
        assert_eq!(hub.remove(2, "0xb"), Some(topic));
        assert!(lock(&hub.inner).by_topic.is_empty());
    }
}
