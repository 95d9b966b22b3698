//! The last message of every subject under a filter (a KV bucket's keys, an object store's
//! objects), read through a consumer of our own that is deleted as soon as the listing ends.
//!
//! async-nats's own listings (`kv::Store::keys`, `ObjectStore::list`) create a consumer and
//! leave it to the server, which removes it after 30 s without interest. A stream holds a
//! bounded number of consumers: about a thousand listings in 30 s (a burst of dead letters
//! counted, an operator paging through them, snapshot jobs) made NATS refuse every further
//! consumer with error 10026, the listings and everything else that needs one included. Here
//! the consumer is deleted on the way out, and its own inactivity threshold is short, so a
//! replica killed mid-listing leaves it only seconds. In a cluster the consumer may be placed
//! on another server than the one this client is connected to, whose interest in its pull
//! requests reaches the others a moment after its creation: a first fetch that finds no
//! responder is sent again.
//!
//! A consumer reads from whichever server holds it, and a server still catching up (restarted,
//! or the stream just restored) answered an empty or short listing as if it were the whole: a
//! restored snapshot bucket read as "empty" (found by an adversarial run), and the removal of
//! unfinished uploads would have taken live snapshots' chunks for abandoned ones. So the stream
//! leader is first asked which subjects the filter holds, and a listing that misses any of them
//! is made again (a new consumer: another server, or the same one caught up) a few times in
//! the next second or two before it fails: a listing made right after a restore or a server's
//! restart failed a test's check of the published snapshots under load (found by a loop of that
//! test), and an operator's `dead-letters list` the same way.
//!
//! It reads; it neither decides what a subject means nor changes the stream.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::stream::Stream;
use tokio_stream::StreamExt;

/// How long the server keeps a listing's consumer that nobody reads or deletes (its replica
/// died mid-listing): every fetch of a listing comes well within it.
const ABANDONED_AFTER: Duration = Duration::from_secs(5);

/// How many messages one fetch asks for.
const FETCH_BATCH: usize = 1_000;

/// How long one fetch may take. A fetch whose answer was lost (its consumer's server restarted
/// mid-listing) waited for ever: a ListDeadLetters call hung for 13 minutes (found by an
/// adversarial run).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times in a row a fetch that found no one to answer it is sent again, each after a
/// pause of [`NO_RESPONDER_PAUSE`] times its number (about 2 s in all).
const NO_RESPONDER_RETRIES: u32 = 20;
const NO_RESPONDER_PAUSE: Duration = Duration::from_millis(10);

/// How many times a listing that missed a subject the stream's leader holds is made again,
/// each after a pause of [`MISSED_PAUSE`] times its number (1.5 s in all), before it fails.
const MISSED_RETRIES: u32 = 5;
const MISSED_PAUSE: Duration = Duration::from_millis(100);

/// The last message of every subject matching `filter` in `stream`, in stream order (only
/// their headers if `headers_only`). Subjects that gain their first message during the
/// listing may or may not be in it; one the stream's leader held before it that the listing
/// misses, [`MISSED_RETRIES`] times over, fails it (a subject removed in between is not
/// missed at the next try).
pub(super) async fn last_per_subject(
    stream: &Stream,
    filter: String,
    headers_only: bool,
) -> Result<Vec<Message>, async_nats::Error> {
    let mut retries = 0;
    loop {
        match listed_once(stream, &filter, headers_only).await? {
            Listing::Whole(listed) => return Ok(listed),
            Listing::Missed(reason) if retries == MISSED_RETRIES => return Err(reason.into()),
            Listing::Missed(reason) => {
                retries += 1;
                tracing::debug!(%reason, retries, "listing made again");
                tokio::time::sleep(MISSED_PAUSE * retries).await;
            }
        }
    }
}

/// What one listing read.
enum Listing {
    /// Every subject the stream's leader held.
    Whole(Vec<Message>),
    /// Not: which subject it missed, and how many it read.
    Missed(String),
}

/// One listing through one consumer ([`last_per_subject`]).
async fn listed_once(
    stream: &Stream,
    filter: &str,
    headers_only: bool,
) -> Result<Listing, async_nats::Error> {
    let held = subjects_held(stream, filter).await?;
    let consumer = listing_consumer(stream, filter.to_owned(), headers_only).await?;
    let (name, pending) = {
        let info = consumer.cached_info();
        (info.name.clone(), info.num_pending)
    };
    let listed = read_all(&consumer, pending).await;
    if let Err(err) = stream.delete_consumer(&name).await {
        // The server removes it after `ABANDONED_AFTER` anyway.
        tracing::debug!(consumer = %name, error = %err, "listing consumer not deleted");
    }
    let listed = listed?;
    let read = listed.iter().map(|message| message.subject.as_str());
    if let Some(subject) = first_missed(&held, read) {
        return Ok(Listing::Missed(format!(
            "the listing of {filter} missed {subject}, which the stream's leader holds (it read \
             {} of {} subjects: the server that read it is catching up, most likely)",
            listed.len(),
            held.len()
        )));
    }
    Ok(Listing::Whole(listed))
}

/// The first of the subjects `held` that the subjects `read` miss.
fn first_missed<'a, 'b>(
    held: &'a [String],
    read: impl IntoIterator<Item = &'b str>,
) -> Option<&'a str> {
    let read: HashSet<&str> = read.into_iter().collect();
    held.iter()
        .map(String::as_str)
        .find(|subject| !read.contains(subject))
}

/// The subjects matching `filter` that `stream` holds, as its leader answers.
async fn subjects_held(stream: &Stream, filter: &str) -> Result<Vec<String>, async_nats::Error> {
    let mut subjects = stream.clone().info_with_subjects(filter).await?;
    let mut held = Vec::new();
    while let Some(subject) = subjects.next().await {
        held.push(subject?.0);
    }
    Ok(held)
}

/// A consumer of the last message of every subject matching `filter`, kept in memory on one
/// server, and removed by the server [`ABANDONED_AFTER`] without a fetch.
async fn listing_consumer(
    stream: &Stream,
    filter: String,
    headers_only: bool,
) -> Result<Consumer<pull::Config>, async_nats::Error> {
    let consumer = stream
        .create_consumer(pull::Config {
            description: Some("profile-state listing".into()),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            headers_only,
            inactive_threshold: ABANDONED_AFTER,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        })
        .await?;
    Ok(consumer)
}

/// Fetches until the consumer has nothing pending (or a fetch brings nothing: what was
/// pending was removed meanwhile).
async fn read_all(
    consumer: &Consumer<pull::Config>,
    mut pending: u64,
) -> Result<Vec<Message>, async_nats::Error> {
    let mut listed = Vec::with_capacity(pending.min(FETCH_BATCH as u64) as usize);
    let mut unanswered = 0;
    while pending > 0 {
        let before = listed.len();
        let fetched =
            tokio::time::timeout(FETCH_TIMEOUT, fetch(consumer, &mut listed, &mut pending));
        let fetched = fetched.await.unwrap_or_else(|_| {
            Err(format!("a fetch went unanswered for {FETCH_TIMEOUT:?}").into())
        });
        match fetched {
            Ok(()) => unanswered = 0,
            // In a cluster the consumer may be on another server, where it is not listening
            // yet right after its creation: nothing was delivered, ask again.
            Err(err) if no_responders(&*err) && unanswered < NO_RESPONDER_RETRIES => {
                unanswered += 1;
                tokio::time::sleep(NO_RESPONDER_PAUSE * unanswered).await;
                continue;
            }
            Err(err) => return Err(err),
        }
        if listed.len() == before {
            break;
        }
    }
    Ok(listed)
}

/// One fetch of up to [`FETCH_BATCH`] messages into `listed`.
async fn fetch(
    consumer: &Consumer<pull::Config>,
    listed: &mut Vec<Message>,
    pending: &mut u64,
) -> Result<(), async_nats::Error> {
    let asked = (*pending).min(FETCH_BATCH as u64) as usize;
    let mut messages = consumer.fetch().max_messages(asked).messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        *pending = message.info()?.pending;
        listed.push(message);
    }
    Ok(())
}

/// Whether a fetch's error is NATS' status 503, no responders, which async-nats 0.51 reports
/// only in its text ("error while processing messages from the stream: 503, None").
fn no_responders(err: &(dyn std::error::Error + 'static)) -> bool {
    err.to_string().contains("from the stream: 503")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing read from a server still catching up came back short, and was taken for the
    /// whole (a restored bucket read as empty: found by an adversarial run): a subject the
    /// leader holds that the listing lacks is found; extra ones (new since) are not missed ones.
    #[test]
    fn a_subject_the_leader_holds_that_the_listing_lacks_is_found() {
        let held = ["$O.B.M.a", "$O.B.M.b"].map(String::from);
        assert_eq!(
            first_missed(&held, ["$O.B.M.a", "$O.B.M.b", "$O.B.M.c"]),
            None
        );
        assert_eq!(first_missed(&held, ["$O.B.M.a"]), Some("$O.B.M.b"));
        assert_eq!(first_missed(&held, []), Some("$O.B.M.a"));
        assert_eq!(first_missed(&[], ["$O.B.M.a"]), None);
    }

    /// A fetch whose answer never came (its server restarted mid-listing) kept a
    /// ListDeadLetters call waiting for 13 minutes (found by an adversarial run). Here the
    /// server is stopped (SIGSTOP) between the consumer's creation and its first fetch: the
    /// listing fails after [`FETCH_TIMEOUT`] instead. The client pings only every minute, so it
    /// does not notice the server is gone within the test.
    #[tokio::test]
    async fn a_fetch_that_goes_unanswered_fails_the_listing() {
        let nats = nats_harness::NatsCluster::single().await.unwrap();
        let client = async_nats::connect(nats.client_urls()).await.unwrap();
        let context = async_nats::jetstream::new(client);
        let stream = context
            .create_stream(async_nats::jetstream::stream::Config {
                name: "UNANSWERED".into(),
                subjects: vec!["unanswered.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        for key in ["a", "b", "c"] {
            let subject = format!("unanswered.{key}");
            context
                .publish(subject, "x".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let consumer = listing_consumer(&stream, "unanswered.>".into(), false)
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending;
        assert_eq!(pending, 3);
        let server = &nats.nodes()[0];
        server.pause().unwrap();
        let listed = tokio::time::timeout(FETCH_TIMEOUT * 3, read_all(&consumer, pending)).await;
        server.resume().unwrap();
        let error = listed
            .expect("the listing ends by itself")
            .expect_err("nothing was answered");
        assert!(error.to_string().contains("unanswered"), "{error}");
    }
}
