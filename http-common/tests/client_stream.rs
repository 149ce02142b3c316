//! `UdsClient::stream` against the real server over a real socket: chunks arrive as the server
//! sends them, the deadline covers the response head only, and a streaming request holds its
//! in-flight slot until its body is dropped.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use http_common::client::MAX_CONCURRENT_REQUESTS;
use http_common::{ClientError, Handler, Request, Response, ServerOptions, UdsClient};
use hyper::body::Frame;
use tokio::sync::mpsc;

/// Answers every request with 200 and a body fed by the next queued channel (a body that never
/// ends when no channel is queued).
#[derive(Default)]
struct Feeds {
    queued: Mutex<VecDeque<mpsc::UnboundedReceiver<Bytes>>>,
}

impl Feeds {
    fn feed(&self) -> mpsc::UnboundedSender<Bytes> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.queued.lock().unwrap().push_back(receiver);
        sender
    }
}

impl Handler for Feeds {
    async fn handle(&self, _request: Request) -> Response {
        let receiver = self.queued.lock().unwrap().pop_front();
        let chunks = futures_util::stream::unfold(receiver, |receiver| async move {
            let mut receiver = receiver?;
            let chunk = receiver.recv().await?;
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk)),
                Some(receiver),
            ))
        });
        let mut response = hyper::Response::new(StreamBody::new(chunks).boxed());
        *response.status_mut() = StatusCode::OK;
        response
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_bodies_arrive_in_chunks_past_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stream.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let feeds = Arc::new(Feeds::default());
    tokio::spawn(http_common::serve(
        listener,
        Arc::clone(&feeds),
        ServerOptions::default(),
        std::future::pending(),
    ));
    let client = UdsClient::new(&socket).with_timeout(Duration::from_secs(1));

    // Chunks come as they are sent, also after the client's 1 s deadline.
    let sender = feeds.feed();
    let mut response = client
        .stream(Method::GET, "/follow", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    sender.send(Bytes::from_static(b"one")).unwrap();
    assert_eq!(response.body.chunk().await.unwrap().unwrap(), "one");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sender.send(Bytes::from_static(b"two")).unwrap();
    assert_eq!(response.body.chunk().await.unwrap().unwrap(), "two");
    drop(sender);
    assert_eq!(response.body.chunk().await.unwrap(), None);
    drop(response);

    // `send` reads the whole body within the deadline, so a body that never ends times out.
    let _never_ends = feeds.feed();
    let error = client
        .send(Method::GET, "/follow", &[], Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");

    // Open streams hold their in-flight slots: with all of them taken a request waits (and
    // here times out); dropping one body frees a slot.
    let mut feeders = Vec::new();
    let mut open = Vec::new();
    for _ in 0..MAX_CONCURRENT_REQUESTS {
        feeders.push(feeds.feed());
        open.push(
            client
                .stream(Method::GET, "/follow", &[], Bytes::new())
                .await
                .unwrap(),
        );
    }
    let error = client
        .stream(Method::GET, "/follow", &[], Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    drop(open.pop());
    let sender = feeds.feed();
    let response = client
        .stream(Method::GET, "/follow", &[], Bytes::new())
        .await
        .unwrap();
    sender.send(Bytes::from_static(b"last")).unwrap();
    drop(sender);
    assert_eq!(response.body.collect().await.unwrap(), "last");
}
