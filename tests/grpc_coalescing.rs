//! A gRPC connection's writes held until the worker's turn (`server/coalesce.rs`) never hold an
//! answer back: many concurrent unary calls on one connection, and a watch stream's one change
//! after a quiet moment, each arrive. A held write that nothing writes out runs into the
//! deadline.

use crate::common;

use std::time::Duration;

use common::{TestService, at, profile_updated};
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use serde_json::json;
use tokio::task::JoinSet;

const PROMPTLY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unary_calls_and_a_quiet_watch_on_one_connection_answer_promptly() {
    let service = TestService::start().await;
    service
        .update(&profile_updated("c1", &at(1), json!({"total_points": 1})))
        .await;
    let channel = service.channel().await;
    let mut watching = ProfileServiceClient::new(channel.clone())
        .watch_profiles(pb::WatchProfilesRequest {
            customer_ids: vec!["c2".into()],
            ..Default::default()
        })
        .await
        .expect("watch starts")
        .into_inner();
    for round in 0..3 {
        let mut calls = JoinSet::new();
        for _ in 0..200 {
            let mut client = ProfileServiceClient::new(channel.clone());
            calls.spawn(async move {
                tokio::time::timeout(
                    PROMPTLY,
                    client.get_profile(pb::GetProfileRequest {
                        client_id: "2155".into(),
                        customer_id: "c1".into(),
                        ..Default::default()
                    }),
                )
                .await
                .expect("an answer in time")
                .expect("GetProfile answers");
            });
        }
        while let Some(answered) = calls.join_next().await {
            answered.unwrap();
        }
        // A quiet moment (the condition under test, not a wait for something), then one
        // change for the watcher.
        tokio::time::sleep(Duration::from_millis(300)).await;
        service
            .update(&profile_updated(
                "c2",
                &at(10 + round),
                json!({"total_points": round}),
            ))
            .await;
        loop {
            let message = tokio::time::timeout(PROMPTLY, watching.message())
                .await
                .expect("the watch message arrives in time")
                .expect("no error")
                .expect("not over");
            if let Some(pb::watch_profiles_response::Event::Change(_)) = message.event {
                break;
            }
        }
    }
}
