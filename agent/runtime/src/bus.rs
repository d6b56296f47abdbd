//! The in-process message bus: components subscribe with subject patterns and publish
//! through the `messaging` import; the local API publishes too. The sync layer bridges it
//! to the fleet (NATS or MQTT): messages from the fleet come in through
//! [`Bus::publish_wait`], and the agent's forwarding subscription takes what goes up.
//!
//! Delivery is bounded: each subscription has a queue, and a full queue drops the message
//! with a warning and a counter rather than stalling the publisher.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;

/// A message on the bus.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub payload: Bytes,
}

#[derive(Debug)]
struct Subscription {
    id: u64,
    component: String,
    patterns: Vec<String>,
    tx: mpsc::Sender<Message>,
}

impl Subscription {
    fn wants(&self, subject: &str, from: Option<&str>) -> bool {
        Some(self.component.as_str()) != from
            && self
                .patterns
                .iter()
                .any(|p| perch_core::spec::subject_matches(p, subject))
    }
}

/// The bus.
#[derive(Debug, Default)]
pub struct Bus {
    subs: RwLock<Vec<Subscription>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    published: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Subscribes `component` to `pattern`; returns the id (to unsubscribe) and the queue.
    pub fn subscribe(
        &self,
        component: &str,
        pattern: &str,
        capacity: usize,
    ) -> (u64, mpsc::Receiver<Message>) {
        self.subscribe_any(component, &[pattern.to_string()], capacity)
    }

    /// Subscribes `component` to every subject matching any of `patterns`, each message
    /// once, through one queue.
    pub fn subscribe_any(
        &self,
        component: &str,
        patterns: &[String],
        capacity: usize,
    ) -> (u64, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Subscription {
            id,
            component: component.to_string(),
            patterns: patterns.to_vec(),
            tx,
        };
        self.subs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sub);
        (id, rx)
    }

    /// Removes a subscription.
    pub fn unsubscribe(&self, id: u64) {
        self.subs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|s| s.id != id);
    }

    /// Delivers to every matching subscription except the publisher's own; returns how many
    /// subscriptions accepted it.
    pub fn publish(&self, subject: &str, payload: Bytes, from: Option<&str>) -> usize {
        self.published.fetch_add(1, Ordering::Relaxed);
        let subs = self
            .subs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut delivered = 0;
        for s in subs.iter() {
            if !s.wants(subject, from) {
                continue;
            }
            let msg = Message {
                subject: subject.to_string(),
                payload: payload.clone(),
            };
            match s.tx.try_send(msg) {
                Ok(()) => delivered += 1,
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(component = %s.component, subject, "message dropped: the component's queue is full");
                }
            }
        }
        delivered
    }

    /// Delivers like [`Self::publish`], but waits for room in each matching queue instead of
    /// dropping: for messages that arrive from outside (the fleet), whose sender is slowed
    /// down rather than losing them. Returns how many subscriptions took it.
    pub async fn publish_wait(&self, subject: &str, payload: Bytes, from: Option<&str>) -> usize {
        self.published.fetch_add(1, Ordering::Relaxed);
        let targets: Vec<mpsc::Sender<Message>> = {
            let subs = self
                .subs
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            subs.iter()
                .filter(|s| s.wants(subject, from))
                .map(|s| s.tx.clone())
                .collect()
        };
        let mut delivered = 0;
        for tx in targets {
            let msg = Message {
                subject: subject.to_string(),
                payload: payload.clone(),
            };
            // Room now: no await. A closed queue (the component was stopped) is skipped.
            let sent = match tx.try_send(msg) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(msg)) => tx.send(msg).await.is_ok(),
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            delivered += usize::from(sent);
        }
        delivered
    }

    /// Messages dropped because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Messages published.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_wait_waits_for_room_instead_of_dropping() {
        let bus = Bus::new();
        let (_, mut rx) = bus.subscribe("c", "in.>", 1);
        assert_eq!(
            bus.publish_wait("in.a", Bytes::from_static(b"1"), None)
                .await,
            1
        );
        let b = bus.clone();
        let second =
            tokio::spawn(
                async move { b.publish_wait("in.a", Bytes::from_static(b"2"), None).await },
            );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the queue is full: the second waits");
        assert_eq!(
            rx.recv().await.map(|m| m.payload),
            Some(Bytes::from_static(b"1"))
        );
        assert_eq!(second.await.ok(), Some(1));
        assert_eq!(
            rx.recv().await.map(|m| m.payload),
            Some(Bytes::from_static(b"2"))
        );
        assert_eq!(bus.dropped(), 0);
        // The sender's own subscription is skipped, as with `publish`.
        assert_eq!(bus.publish_wait("in.a", Bytes::new(), Some("c")).await, 0);
    }

    #[tokio::test]
    async fn routes_by_pattern_and_skips_the_publisher() {
        let bus = Bus::new();
        let (_, mut a) = bus.subscribe("a", "cmd.*", 4);
        let (id_b, mut b) = bus.subscribe("b", "cmd.>", 4);
        assert_eq!(bus.publish("cmd.x", Bytes::from_static(b"1"), None), 2);
        assert_eq!(bus.publish("cmd.x.y", Bytes::from_static(b"2"), None), 1);
        assert_eq!(bus.publish("cmd.x", Bytes::from_static(b"3"), Some("a")), 1);
        assert_eq!(
            a.recv().await.map(|m| m.payload),
            Some(Bytes::from_static(b"1"))
        );
        assert!(a.try_recv().is_err());
        let got: Vec<Bytes> = [b.recv().await, b.recv().await, b.recv().await]
            .into_iter()
            .flatten()
            .map(|m| m.payload)
            .collect();
        assert_eq!(
            got,
            [
                Bytes::from_static(b"1"),
                Bytes::from_static(b"2"),
                Bytes::from_static(b"3")
            ]
        );
        bus.unsubscribe(id_b);
        assert_eq!(bus.publish("cmd.x", Bytes::new(), None), 1);
    }

    #[tokio::test]
    async fn full_queues_drop_and_count() {
        let bus = Bus::new();
        let (_, _rx) = bus.subscribe("a", "x", 1);
        assert_eq!(bus.publish("x", Bytes::new(), None), 1);
        assert_eq!(bus.publish("x", Bytes::new(), None), 0);
        assert_eq!(bus.dropped(), 1);
    }
}
