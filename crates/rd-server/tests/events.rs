//! The events interface a gateway of one's own is built on: [`Server::subscribe`] tells a
//! subscriber of agents' sessions, the drain and the shutdown, and
//! [`Server::shutdown_token`] is cancelled when the shutdown begins.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rd_server::{Server, ServerEvents, TunnelIdHeader};

/// Records what it is told, in order.
#[derive(Default, Clone)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn seen(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
}

impl ServerEvents for Log {
    fn draining(&self) {
        self.push("draining".into());
    }
    fn session_added(&self, client_key: &str) {
        self.push(format!("session {client_key}"));
    }
    fn shutting_down(&self) {
        self.push("shutting down".into());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_sessions_the_drain_and_the_shutdown_once_each() {
    let server = Server::builder(TunnelIdHeader).build();
    let log = Log::default();
    server.subscribe(log.clone());
    let stopped = server.shutdown_token();
    let ts = serve(server.clone()).await;
    let _agent = connected_agent(&ts, "foo").await;
    wait_until("the session is told", || {
        log.seen().contains(&"session foo".to_string())
    })
    .await;
    server.begin_drain();
    server.begin_drain();
    assert!(!stopped.is_cancelled(), "a drain is not a shutdown");
    server.shutdown(Duration::from_secs(5)).await;
    bounded("the shutdown token", stopped.cancelled()).await;
    assert_eq!(log.seen(), ["session foo", "draining", "shutting down"]);

    // A late subscriber learns at once where the server is.
    let late = Log::default();
    server.subscribe(late.clone());
    assert_eq!(late.seen(), ["draining", "shutting down"]);
}
